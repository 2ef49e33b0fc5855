"""SAEs: dictionary recovery on synthetic data, SAELens folders, metrics and gradients against
independent computations on a tiny random GPT-2, the feature probe, resumable training."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from sparsescope.analysis.sae_metrics import ce_recovered, evaluate
from sparsescope.analysis.sae_train import TrainConfig, Trainer, activations_and_grads, train_sae
from sparsescope.probes.hooks import hooked
from sparsescope.probes.models import load_model, minilm_path
from sparsescope.probes.sae import SAE, SaeError, load_sae
from sparsescope.probes.sae_probe import SaeProbe
from sparsescope.store.reader import Reader

HOOK = "blocks.1.hook_resid_post"
D_MODEL = 32


def np_encode(x: np.ndarray, w: dict, k: int, sub_b_dec: bool = True) -> np.ndarray:
    """Independent TopK encoder in numpy (float64)."""
    pre = ((x - w["b_dec"]) if sub_b_dec else x) @ w["W_enc"] + w["b_enc"]
    z = np.zeros_like(pre)
    idx = np.argsort(-pre, axis=1, kind="stable")[:, :k]
    np.put_along_axis(z, idx, np.maximum(np.take_along_axis(pre, idx, 1), 0), 1)
    return z


def weights(sae: SAE) -> dict[str, np.ndarray]:
    return {n: p.detach().double().numpy() for n, p in sae.named_parameters()}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One torch thread: on a shared 2-core machine more threads only contend."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """A tiny random GPT-2 with MiniLM's tokenizer, as a Hugging Face folder."""
    folder = tmp_path_factory.mktemp("models") / "tiny-gpt2"
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=D_MODEL, n_layer=2, n_head=2
    )
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model(gpt2_dir):
    return load_model(str(gpt2_dir))


@pytest.fixture(scope="module")
def hf(gpt2_dir):
    return GPT2LMHeadModel.from_pretrained(gpt2_dir).eval()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = np.random.default_rng(0)
    words = "the cat dog sat on a mat and ran to house tree red blue big small".split()
    docs = [" ".join(rng.choice(words, 30)) for _ in range(300)]
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    path.write_text("\n\n".join(docs))
    return path


def random_sae(d_in: int, d_sae: int, k: int, seed: int = 1) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(d_in, d_sae, k, HOOK)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return sae.eval()


def test_topk_sae_recovers_a_sparse_dictionary():
    torch.manual_seed(0)
    d, n_atoms, active = 32, 64, 3
    atoms = torch.nn.functional.normalize(torch.randn(n_atoms, d), dim=1)
    cfg = TrainConfig("synthetic", "x", k=active, batch_size=256, lr=3e-3, dead_tokens=20_000)
    sae = SAE(d, 2 * n_atoms, active, "x")
    trainer = Trainer(sae, cfg)
    for _ in range(1500):
        idx = torch.rand(256, n_atoms).argsort(1)[:, :active]
        coef = torch.zeros(256, n_atoms).scatter(1, idx, 0.5 + torch.rand(256, active))
        trainer.step(coef @ atoms)
    dec = sae.W_dec.detach().numpy()
    cos = atoms.numpy() @ (dec / np.linalg.norm(dec, axis=1, keepdims=True)).T
    recovered = (cos.max(1) > 0.9).mean()
    print(f"atoms recovered (cos > 0.9): {recovered:.0%}")
    assert recovered >= 0.8
    assert np.allclose(np.linalg.norm(dec, axis=1), 1, atol=1e-5)


def test_folder_round_trip(tmp_path):
    sae = random_sae(D_MODEL, 64, 5)
    sae.save(tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    x = torch.randn(50, D_MODEL)
    assert torch.equal(sae(x), back(x)) and torch.equal(sae.encode(x), back.encode(x))
    assert (back.hook_name, back.k, back.d_sae) == (HOOK, 5, 64)


@pytest.mark.parametrize("layout", ["topk", "standard", "metadata"])
def test_handwritten_saelens_folder(tmp_path, layout):
    rng = np.random.default_rng(0)
    d_in, d_sae, k = 8, 24, 3
    w = {
        "W_enc": rng.normal(size=(d_in, d_sae)).astype(np.float32),
        "b_enc": rng.normal(size=d_sae).astype(np.float32),
        "W_dec": rng.normal(size=(d_sae, d_in)).astype(np.float32),
        "b_dec": rng.normal(size=d_in).astype(np.float32),
    }
    save_file(w, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"d_in": d_in, "d_sae": d_sae, "apply_b_dec_to_input": layout != "standard"}
    cfg |= {
        "topk": {"architecture": "topk", "k": k, "hook_name": HOOK},
        "standard": {
            "architecture": "standard",
            "activation_fn_str": "topk",
            "activation_fn_kwargs": {"k": k},
            "hook_name": HOOK,
        },
        "metadata": {"architecture": "topk", "k": k, "metadata": {"hook_name": HOOK}},
    }[layout]
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    x = rng.normal(size=(20, d_in))
    z = np_encode(x, {n: v.astype(np.float64) for n, v in w.items()}, k, layout != "standard")
    got = sae.encode(torch.tensor(x, dtype=torch.float32)).detach().double().numpy()
    np.testing.assert_allclose(got, z, atol=1e-5)
    np.testing.assert_allclose(
        sae.decode(torch.tensor(z, dtype=torch.float32)).detach().numpy(),
        z @ w["W_dec"] + w["b_dec"],
        atol=1e-5,
    )


def test_jumprelu_config_over_topk_weights_is_refused(tmp_path):
    random_sae(4, 8, 2).save(tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    cfg |= {"architecture": "jumprelu", "activation_fn_str": "relu"}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaeError, match="lacks threshold"):
        load_sae(tmp_path)


def identity_sae(d: int) -> SAE:
    """x̂ = x exactly: z = ReLU([x, −x]) (the top d of 2d values), W_dec = [I; −I]."""
    sae = SAE(d, 2 * d, d, HOOK)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def hf_run(hf, ids, replace=None):
    """Plain HF forward: (mean next-token CE, block-1 output from position 1)."""
    seen = {}

    def hook(module, args, out):
        hidden = out[0] if isinstance(out, tuple) else out
        seen["x"] = hidden[:, 1:].detach().clone()
        if replace is not None:
            hidden = hidden.clone()
            hidden[:, 1:] = replace(hidden[:, 1:])
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = hf.transformer.h[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            loss = hf(input_ids=ids, labels=ids).loss
    finally:
        handle.remove()
    return float(loss), seen["x"]


def test_metrics_match_independent_computation(model, hf):
    torch.manual_seed(0)
    batches = [torch.randint(0, 1000, (4, 16)) for _ in range(2)]
    identity, _ = evaluate(model, identity_sae(D_MODEL), batches)
    assert identity["ce_recovered"] == pytest.approx(1, abs=1e-5)
    assert identity["fvu"] == pytest.approx(0, abs=1e-9)
    zero = random_sae(D_MODEL, 64, 4)
    with torch.no_grad():
        zero.W_dec.zero_()
        zero.b_dec.zero_()
    assert evaluate(model, zero, batches)[0]["ce_recovered"] == pytest.approx(0, abs=1e-6)

    sae = random_sae(D_MODEL, 64, 4)
    metrics, stats = evaluate(model, sae, batches)
    w = weights(sae)
    clean, spliced, xs = [], [], []
    for ids in batches:
        ce, x = hf_run(hf, ids)
        clean.append(ce)
        xs.append(x.reshape(-1, D_MODEL).double().numpy())
        spliced.append(
            hf_run(
                hf,
                ids,
                lambda h: torch.tensor(
                    np_encode(h.double().numpy().reshape(-1, D_MODEL), w, 4) @ w["W_dec"]
                    + w["b_dec"],
                    dtype=h.dtype,
                ).reshape(h.shape),
            )[0]
        )
    zero_abl = [hf_run(hf, ids, torch.zeros_like)[0] for ids in batches]
    x = np.concatenate(xs)
    z = np_encode(x, w, 4)
    x_hat = z @ w["W_dec"] + w["b_dec"]
    assert metrics["ce_clean"] == pytest.approx(np.mean(clean), rel=1e-5)
    assert metrics["ce_zero_abl"] == pytest.approx(np.mean(zero_abl), rel=1e-5)
    assert metrics["ce_spliced"] == pytest.approx(np.mean(spliced), rel=1e-4)
    assert metrics["ce_recovered"] == pytest.approx(
        (np.mean(zero_abl) - np.mean(spliced)) / (np.mean(zero_abl) - np.mean(clean)), rel=1e-3
    )
    fvu = ((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert metrics["fvu"] == pytest.approx(fvu, rel=1e-4)
    assert metrics["l0"] == pytest.approx((z > 0).sum(1).mean())
    freq = (z > 0).mean(0)
    assert metrics["dead"] == (freq == 0).sum() and metrics["dense"] == (freq > 0.1).sum()
    assert metrics["dead_over_tokens"] == len(x)
    np.testing.assert_array_equal(stats["n_active"], (z > 0).sum(0))
    assert ce_recovered(3.0, 5.0, 4.0) == 0.5


def test_gsae_gradients_match_autograd(model, hf):
    ids = torch.randint(0, 1000, (2, 12))
    rows = activations_and_grads(model, ids, HOOK)
    seen = {}

    def hook(module, args, out):
        hidden = (out[0] if isinstance(out, tuple) else out).detach().clone()
        seen["h"] = hidden.requires_grad_(True)
        return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

    handle = hf.transformer.h[1].register_forward_hook(hook)
    try:
        logits = hf(input_ids=ids).logits
    finally:
        handle.remove()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
    )
    loss.backward()
    x, g = seen["h"].detach()[:, 1:], seen["h"].grad[:, 1:]
    torch.testing.assert_close(rows[:, :D_MODEL], x.reshape(-1, D_MODEL))
    torch.testing.assert_close(rows[:, D_MODEL:], g.reshape(-1, D_MODEL), rtol=1e-4, atol=1e-6)


def test_feature_probe_matches_independent_encode(model, hf):
    sae = random_sae(D_MODEL, 64, 6)
    probe = SaeProbe(sae, "s1")
    ids = torch.randint(0, 1000, (3, 10))
    probe.start_batch([7, 8, 9], 10)
    with torch.inference_mode(), hooked(model.bridge, probe.hooks()):
        model.backbone()(input_ids=ids)
    rows = probe.take_rows()["sae_feature_acts"][0].to_pandas()
    _, x = hf_run(hf, ids)
    z = np_encode(x.double().numpy().reshape(-1, D_MODEL), weights(sae), 6)
    tok, feat = np.nonzero(z)
    seq, pos = np.repeat([7, 8, 9], 9), np.tile(np.arange(1, 10), 3)
    expected = {(seq[t], pos[t], f): z[t, f] for t, f in zip(tok, feat, strict=True)}
    got = {(r.seq_id, r.pos, r.feature): r.value for r in rows.itertuples()}
    assert got.keys() == expected.keys()
    np.testing.assert_allclose([got[key] for key in expected], list(expected.values()), rtol=1e-4)
    assert rows["feature"].is_monotonic_increasing and (rows["sae_id"] == "s1").all()
    stats = probe.feature_stats().to_pandas()
    np.testing.assert_array_equal(stats["n_active"], (z > 0).sum(0))
    assert (stats["n_tokens"] == 27).all()


def test_training_resumes_exactly_and_registers(gpt2_dir, corpus, tmp_path, monkeypatch):
    cfg = TrainConfig(
        str(gpt2_dir),
        HOOK,
        str(corpus),
        "gsae",
        k=4,
        expansion=2,
        tokens=3000,
        batch_size=128,
        seq_len=32,
        model_batch=4,
        buffer_tokens=512,
        heldout_tokens=256,
        every_heldout=5,
        dead_tokens=500,
    )
    whole = train_sae(cfg, tmp_path / "a", quiet=True)
    calls = {"n": 0}
    step = Trainer.step

    def interrupted(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return step(self, *args)

    monkeypatch.setattr(Trainer, "step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_sae(cfg, tmp_path / "b", quiet=True)
    assert not Reader(tmp_path / "b").sql("SELECT * FROM saes").shape[0]
    resumed = train_sae(cfg, tmp_path / "b", quiet=True)
    a, b = load_sae(whole["path"]), load_sae(resumed["path"])
    for name, p in a.named_parameters():
        torch.testing.assert_close(p, getattr(b, name), msg=name)
    keys = {"l0", "fvu", "ce_recovered", "dead", "dense", "dead_over_tokens", "train_seconds"}
    assert keys <= resumed["metrics"].keys()
    again = train_sae(cfg, tmp_path / "b", quiet=True)  # finished: registers, trains nothing
    assert again["metrics"] == resumed["metrics"]
    r = Reader(tmp_path / "b")
    row = r.sql("SELECT * FROM saes").iloc[0]
    assert (row["arch"], row["k"], row["d_sae"], row["path"]) == ("gsae", 4, 64, resumed["path"])
    assert json.loads(row["metrics"])["fvu"] == resumed["metrics"]["fvu"]
    runs = r.sql("SELECT kind, status FROM runs WHERE kind = 'sae'")
    assert runs["status"].tolist() == ["complete"]
    n = r.sql("SELECT count(*) AS n FROM sae_feature_stats").iloc[0, 0]
    assert n == 64
