"""Published SAE layouts: folders written in SAELens's (6.x and pre-6.0) and EleutherAI
sparsify's own on-disk layouts, loaded by SparseScope and compared with numpy encoders written
here from each tool's definition; model-name checks, content ids and malformed folders."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors.torch import save_file
from streamlit.testing.v1 import AppTest
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from sparsescope.app.state import STORE_ENV
from sparsescope.probes.models import minilm_path
from sparsescope.probes.sae import SAE, load_sae, model_name_matches, sae_id_of, sparsify_hook
from sparsescope.store.errors import BadInput
from sparsescope.store.reader import Reader
from tests.conftest import fingerprint, run_cli

HOOK = "blocks.1.hook_resid_post"
D_IN, D_SAE, K = 16, 48, 5
PAGE = str(Path(__file__).parents[1] / "app" / "views" / "sae_features.py")


# --- independent encoders (float64), from each tool's source ----------------------------------


def relu(a: np.ndarray) -> np.ndarray:
    return np.maximum(a, 0)


def top_k(a: np.ndarray, k: int) -> np.ndarray:
    """Keep each row's k largest entries, zero elsewhere."""
    out = np.zeros_like(a)
    idx = np.argsort(-a, axis=1, kind="stable")[:, :k]
    np.put_along_axis(out, idx, np.take_along_axis(a, idx, 1), 1)
    return out


def sae_in(x, w, apply_b_dec):
    return x - w["b_dec"] if apply_b_dec else x


def np_encode(fmt: str, x: np.ndarray, w: dict) -> np.ndarray:
    """SAELens StandardSAE / TopKSAE (rescale_acts_by_decoder_norm) / JumpReLUSAE / GatedSAE
    encode, and sparsify SparseCoder.encode (relu(linear) then topk), as dense codes."""
    if fmt == "sparsify":
        return top_k(relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"]), K)
    xin = sae_in(x, w, apply_b_dec=not fmt.startswith("jumprelu-gemma"))
    if fmt == "gated":
        gate = (xin @ w["W_enc"] + w["b_gate"]) > 0
        return gate * relu(xin @ (w["W_enc"] * np.exp(w["r_mag"])) + w["b_mag"])
    pre = xin @ w["W_enc"] + w["b_enc"]
    if fmt == "standard":
        return relu(pre)
    if fmt == "topk-rescale":
        return relu(top_k(pre * np.linalg.norm(w["W_dec"], axis=1), K))
    return relu(pre) * (pre > w["threshold"])  # jumprelu


def np_decode(fmt: str, z: np.ndarray, w: dict) -> np.ndarray:
    if fmt == "topk-rescale":  # TopKSAE.decode divides by the decoder norms first
        z = z / np.linalg.norm(w["W_dec"], axis=1)
    return z @ w["W_dec"] + w["b_dec"]


# --- folders in each tool's layout -------------------------------------------------------------


def saelens6_cfg(arch: str, **extra) -> dict:
    """cfg.json as SAELens 6 writes it (SAEConfig.to_dict: fields, metadata, architecture)."""
    return {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": "6.18.0",
            "sae_lens_training_version": "6.18.0",
            "dataset_path": "monology/pile-uncopyrighted",
            "hook_name": HOOK,
            "model_name": "gpt2",
            "model_class_name": "HookedTransformer",
            "hook_head_index": None,
            "context_size": 128,
            "seqpos_slice": [None],
            "model_from_pretrained_kwargs": {},
            "prepend_bos": True,
            "exclude_special_tokens": False,
            "sequence_separator_token": "bos",
            "disable_concat_sequences": False,
        },
        "architecture": arch,
        **extra,
    }


GEMMA_SCOPE_CFG = {  # SAELens's Gemma Scope config (pre-6.0 flat layout)
    "architecture": "jumprelu",
    "d_in": D_IN,
    "d_sae": D_SAE,
    "dtype": "float32",
    "model_name": "gemma-2-2b",
    "hook_name": HOOK,
    "hook_head_index": None,
    "activation_fn": "relu",
    "finetuning_scaling_factor": False,
    "sae_lens_training_version": None,
    "prepend_bos": True,
    "dataset_path": "monology/pile-uncopyrighted",
    "context_size": 1024,
    "dataset_trust_remote_code": True,
    "apply_b_dec_to_input": False,
    "normalize_activations": None,
}


def random_weights(fmt: str, rng: np.random.Generator, x: np.ndarray) -> dict[str, np.ndarray]:
    def normal(*shape, scale=0.5):
        return rng.normal(size=shape, scale=scale)

    if fmt == "sparsify":
        return {
            "encoder.weight": normal(D_SAE, D_IN),
            "encoder.bias": normal(D_SAE, scale=0.1),
            "W_dec": normal(D_SAE, D_IN),
            "b_dec": normal(D_IN, scale=0.1),
        }
    w = {"W_enc": normal(D_IN, D_SAE), "W_dec": normal(D_SAE, D_IN), "b_dec": normal(D_IN)}
    if fmt == "gated":
        return w | {"b_gate": normal(D_SAE), "r_mag": normal(D_SAE), "b_mag": normal(D_SAE)}
    w["b_enc"] = normal(D_SAE, scale=0.3)
    if fmt == "topk-rescale":  # decoder rows of norms 0.1 .. 5
        w["W_dec"] *= np.exp(rng.uniform(np.log(0.1), np.log(5), D_SAE))[:, None]
    if fmt.startswith("jumprelu"):
        pre = sae_in(x, w, fmt == "jumprelu-batchtopk") @ w["W_enc"] + w["b_enc"]
        if fmt == "jumprelu-batchtopk":  # BatchTopK saves one threshold for every latent
            w["threshold"] = np.full(D_SAE, np.quantile(pre, 0.8))
        else:  # per-latent quantiles; some latents never fire, some fire whenever ReLU does
            q = rng.uniform(0.3, 1.05, D_SAE).clip(0, 1)
            w["threshold"] = np.array([np.quantile(pre[:, j], q[j]) for j in range(D_SAE)])
            w["threshold"][:4] = -1.0
        w["threshold"] += 1e-3  # off the data points: no pre-activation at a threshold
    return w


def write_folder(fmt: str, root: Path, w: dict[str, np.ndarray], dtype=torch.float32) -> Path:
    """The SAE in ``fmt``'s own layout; returns the folder to load."""
    tensors = {n: torch.tensor(v, dtype=dtype) for n, v in w.items()}
    if fmt == "sparsify":  # a training checkpoint: config.json and one folder per hookpoint
        ckpt = root / "sae-gpt2-32x"
        cfg = {"activation": "topk", "expansion_factor": 3, "normalize_decoder": True,
               "num_latents": D_SAE, "k": K, "multi_topk": False, "skip_connection": False,
               "transcode": False, "d_in": D_IN}  # fmt: skip
        run = {"sae": {k: v for k, v in cfg.items() if k != "d_in"}, "batch_size": 32,
               "hookpoints": ["h.1"], "model": "openai-community/gpt2", "dataset": "pile",
               "ctx_len": 2048}  # fmt: skip
        (ckpt / "h.1").mkdir(parents=True)
        (ckpt / "config.json").write_text(json.dumps(run))
        (ckpt / "h.1" / "cfg.json").write_text(json.dumps(cfg))
        save_file(tensors, str(ckpt / "h.1" / "sae.safetensors"))
        return ckpt / "h.1"
    folder = root / fmt
    folder.mkdir(parents=True)
    if fmt.startswith("jumprelu-gemma"):
        cfg = GEMMA_SCOPE_CFG
    elif fmt == "topk-rescale":
        cfg = saelens6_cfg("topk", k=K, rescale_acts_by_decoder_norm=True)
    else:
        cfg = saelens6_cfg({"jumprelu-batchtopk": "jumprelu"}.get(fmt, fmt))
    if dtype == torch.bfloat16:
        cfg = cfg | {"dtype": "bfloat16"}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(tensors, str(folder / "sae_weights.safetensors"))
    return folder


FORMATS = ["standard", "topk-rescale", "jumprelu-gemmascope", "jumprelu-batchtopk", "gated",
           "sparsify"]  # fmt: skip
ARCH = {"standard": "standard", "topk-rescale": "topk", "gated": "gated", "sparsify": "topk"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_each_layout_encodes_as_its_tool_defines(tmp_path, fmt):
    rng = np.random.default_rng(FORMATS.index(fmt))
    x = rng.normal(size=(400, D_IN))
    w = random_weights(fmt, rng, x)
    dtype = torch.bfloat16 if fmt == "standard" else torch.float32  # cfg dtype -> float32
    w = {n: torch.tensor(v, dtype=dtype).double().numpy() for n, v in w.items()}
    sae = load_sae(write_folder(fmt, tmp_path, w, dtype))
    assert (sae.arch, sae.hook_name) == (ARCH.get(fmt, "jumprelu"), HOOK)
    assert sae.k == (K if sae.arch == "topk" else None)
    expected = np_encode(fmt, x, w)
    with torch.no_grad():
        z = sae.encode(torch.tensor(x, dtype=torch.float32)).double().numpy()
        x_hat = sae.decode(torch.tensor(expected, dtype=torch.float32)).double().numpy()
    diff = np.abs(z - expected).max()
    decode_diff = np.abs(x_hat - np_decode(fmt, expected, w)).max()
    print(f"{fmt}: max |z - z_ref| = {diff:.2e}, max |x̂ - x̂_ref| = {decode_diff:.2e}")
    assert diff < 1e-4 and decode_diff < 1e-4
    fired = (expected > 0).mean()
    assert 0 < fired < 1
    if fmt == "topk-rescale":  # ignoring the flag would pick other latents
        plain = relu(top_k(sae_in(x, w, True) @ w["W_enc"] + w["b_enc"], K))
        assert ((plain > 0) != (expected > 0)).mean() > 0.05
    if fmt.startswith("jumprelu"):  # the threshold cuts some positive pre-activations
        pre = sae_in(x, w, fmt == "jumprelu-batchtopk") @ w["W_enc"] + w["b_enc"]
        assert ((pre > 0) & (expected == 0)).mean() > 0.05
    if fmt == "gated":  # r_mag matters
        w0 = w | {"r_mag": np.zeros(D_SAE)}
        assert np.abs(np_encode(fmt, x, w0) - expected).max() > 0.1


def test_sparsify_checkpoint_names_its_hookpoints_and_maps_them(tmp_path):
    rng = np.random.default_rng(0)
    folder = write_folder("sparsify", tmp_path, random_weights("sparsify", rng, None))
    sae = load_sae(folder)
    assert sae.hook_name == "blocks.1.hook_resid_post"
    assert sae.meta["model_name"] == "openai-community/gpt2"
    with pytest.raises(BadInput, match=r"holds several SAEs \(h\.1\): name one folder"):
        load_sae(folder.parent)
    assert sae_id_of(folder).startswith("sae-gpt2-32x.h.1-")
    cases = {"layers.6": "blocks.6.hook_resid_post", "model.layers.2.mlp": "blocks.2.hook_mlp_out",
             "h.0.attn": "blocks.0.hook_attn_out", "layers.3.self_attn": "blocks.3.hook_attn_out",
             "embed_tokens": "hook_embed"}  # fmt: skip
    assert {h: sparsify_hook(h) for h in cases} == cases
    with pytest.raises(BadInput, match="no known TransformerLens hook"):
        sparsify_hook("layers.2.mlp.act_fn")


def test_own_folders_use_the_saelens_6_layout_and_round_trip(tmp_path):
    for arch in ("standard", "topk", "gsae", "jumprelu", "gated"):
        torch.manual_seed(0)
        sae = SAE(D_IN, D_SAE, K if arch in ("topk", "gsae") else None, HOOK, arch,
                  meta={"model_name": "gpt2", "sae_id": f"mine-{arch}", "beta": 2.0})  # fmt: skip
        with torch.no_grad():
            for p in sae.parameters():
                p.copy_(torch.randn_like(p) * 0.5)
        sae.save(tmp_path / arch)
        cfg = json.loads((tmp_path / arch / "cfg.json").read_text())
        assert cfg["architecture"] == ("topk" if arch == "gsae" else arch)
        assert cfg["metadata"]["sae_lens_version"].startswith("6.")
        assert (cfg["metadata"]["hook_name"], cfg["metadata"]["model_name"]) == (HOOK, "gpt2")
        assert cfg["sparsescope"] == {"arch": arch, "sae_id": f"mine-{arch}", "beta": 2.0}
        back = load_sae(tmp_path / arch)
        x = torch.randn(50, D_IN)
        assert back.arch == arch and torch.equal(back.encode(x), sae.encode(x))
        assert sae_id_of(tmp_path / arch) == f"mine-{arch}"  # the recorded id is kept


def test_same_named_folders_with_other_weights_get_other_ids(tmp_path):
    rng = np.random.default_rng(0)
    a = write_folder("standard", tmp_path / "a", random_weights("standard", rng, None))
    b = write_folder("standard", tmp_path / "b", random_weights("standard", rng, None))
    shutil.copytree(a, tmp_path / "c" / "standard")
    ids = [sae_id_of(f) for f in (a, b, tmp_path / "c" / "standard")]
    assert ids[0] != ids[1] and ids[0] == ids[2]  # one id per content, not per folder name
    assert all(i.startswith("standard-") and len(i) == len("standard-") + 10 for i in ids)


@pytest.mark.parametrize(
    "change, needle",
    [
        ("drop b_enc", "lacks b_enc"),
        ("add threshold", "has unexpected threshold"),
        ("transpose W_enc", "W_enc has shape (48, 16), the config implies (16, 48)"),
        ("architecture matryoshka", "architecture 'matryoshka' is not supported"),
        ("normalize layer_norm", "normalize_activations='layer_norm' is not supported"),
        ("hook_head_index", "per-head SAE"),
        ("k 0", "k = 0 must be"),
        ("bad json", "not valid JSON"),
        ("no weights", "needs cfg.json with sae_weights.safetensors"),
        ("sparsify transcoder", "transcode=true is not supported"),
        ("sparsify groupmax", "activation 'groupmax' is not supported"),
    ],
)
def test_a_malformed_folder_is_one_bad_input_line(tmp_path, change, needle):
    rng = np.random.default_rng(0)
    fmt = "sparsify" if change.startswith("sparsify") else "standard"
    w = random_weights(fmt, rng, None)
    if change == "drop b_enc":
        del w["b_enc"]
    elif change == "add threshold":
        w["threshold"] = np.zeros(D_SAE)
    elif change == "transpose W_enc":
        w["W_enc"] = np.ascontiguousarray(w["W_enc"].T)
    folder = write_folder(fmt, tmp_path, w)
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg |= {
        "architecture matryoshka": {"architecture": "matryoshka"},
        "normalize layer_norm": {"normalize_activations": "layer_norm"},
        "hook_head_index": {"metadata": cfg.get("metadata", {}) | {"hook_head_index": 3}},
        "k 0": {"architecture": "topk", "k": 0},
        "sparsify transcoder": {"transcode": True},
        "sparsify groupmax": {"activation": "groupmax"},
    }.get(change, {})
    (folder / "cfg.json").write_text("{oops" if change == "bad json" else json.dumps(cfg))
    if change == "no weights":
        (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(BadInput) as err:
        load_sae(folder)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_model_names_are_compared_by_hub_name_and_alias():
    fits = [("gpt2", "openai-community/gpt2"), ("gpt2-small", "gpt2"), ("GPT2", "/m/gpt2/"),
            ("gemma-2-2b", "google/gemma-2-2b"), ("zoo:relu-l4", "zoo:relu-l4@300"),
            ("EleutherAI/pythia-70m", "EleutherAI/pythia-70m@step1000"), (None, "minilm"),
            ("/a/tiny", "/b/tiny")]  # fmt: skip
    misfits = [("gpt2", "minilm"), ("gpt2-medium", "gpt2"), ("pythia-70m", "pythia-160m")]
    assert all(model_name_matches(a, b) for a, b in fits)
    assert not any(model_name_matches(a, b) for a, b in misfits)
    assert model_name_matches("run-7", "series:/ckpts/run-7/step-*@300", "run-7")  # family


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A tiny random GPT-2 (MiniLM's tokenizer) as a Hugging Face folder, and a corpus."""
    tmp = tmp_path_factory.mktemp("tiny")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=D_IN, n_layer=2,
                        n_head=2)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(tmp / "gpt2")
    tokenizer.save_pretrained(tmp / "gpt2")
    words = "the cat dog sat on a mat and ran to house tree red blue big small".split()
    rng = np.random.default_rng(0)
    (tmp / "corpus.txt").write_text("\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(20)))
    return tmp / "gpt2", tmp / "corpus.txt"


def test_probe_refuses_an_sae_of_another_model_unless_told(tiny, tmp_path, monkeypatch):
    """A Gemma-Scope-layout JumpReLU SAE whose metadata names gemma-2-2b: refused in one line
    with the store untouched; with --sae-any-model its features (k NULL in the catalog) equal
    a numpy JumpReLU encode of plain HF hidden states, and the SAE page shows it."""
    model, corpus = tiny
    hf = GPT2LMHeadModel.from_pretrained(model).eval()
    seen = []
    hf.transformer.h[1].register_forward_hook(
        lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():  # hidden states like the probed ones, to place the thresholds
        hf(AutoTokenizer.from_pretrained(model)(corpus.read_text()[:400], return_tensors="pt")[
            "input_ids"][:, :64])  # fmt: skip
    w = random_weights("jumprelu-gemmascope", np.random.default_rng(1), seen.pop()[0].numpy())
    w = {n: v.astype(np.float32).astype(np.float64) for n, v in w.items()}
    folder = write_folder("jumprelu-gemmascope", tmp_path, w)
    store = tmp_path / "store"
    args = ["probe", "--model", str(model), "--data", str(corpus), "--store", str(store),
            "--sae", str(folder), "--max-tokens", "256", "--seq-len", "32"]  # fmt: skip
    refused = run_cli(*args)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "made for 'gemma-2-2b'" in lines[0] and str(model) in lines[0]
    assert "--sae-any-model" in lines[0] and fingerprint(store) == {}
    accepted = run_cli(*args, "--sae-any-model")
    assert accepted.returncode == 0, accepted.stderr

    r = Reader(store)
    (row,) = r.sql("SELECT sae_id, arch, k, hook FROM saes").itertuples()
    assert (row.arch, row.hook, row.sae_id) == ("jumprelu", HOOK, sae_id_of(folder))
    assert pd.isna(row.k)
    tokens = r.sql("SELECT seq_id, token_id FROM tokens ORDER BY seq_id, pos")
    expected, n_pairs = {}, 0
    with torch.no_grad():
        for seq_id, seq in tokens.groupby("seq_id", sort=True):
            hf(torch.tensor(seq["token_id"].to_numpy())[None])
            z = np_encode("jumprelu-gemmascope", seen.pop()[0, 1:].double().numpy(), w)
            n_pairs += z.size
            for t, f in zip(*np.nonzero(z), strict=True):
                expected[(seq_id, t + 1, f)] = z[t, f]
    got = r.sql("SELECT seq_id, pos, feature, value FROM sae_feature_acts")
    values = {(g.seq_id, g.pos, g.feature): g.value for g in got.itertuples()}
    assert values.keys() == expected.keys() and 0 < len(values) < n_pairs / 2
    np.testing.assert_allclose(
        [values[k] for k in expected], list(expected.values()), rtol=1e-4, atol=1e-6
    )

    monkeypatch.setenv(STORE_ENV, str(store))
    at = AppTest.from_file(PAGE, default_timeout=120).run()
    assert not at.exception
    assert at.dataframe[0].value["arch"].tolist() == ["jumprelu"]
