"""AppTest of the "SAE features" page: an empty store, and a store with a trained SAE and a
feature-probe run on a tiny random GPT-2 (contexts and logits checked against the store)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from sparsescope.analysis.sae_train import TrainConfig, train_sae
from sparsescope.app.state import STORE_ENV
from sparsescope.probes.job import ProbeConfig, probe_model
from sparsescope.probes.models import load_model, minilm_path
from sparsescope.probes.sae import load_sae
from sparsescope.store.reader import Reader
from tests.conftest import fingerprint, run_cli
from tests.test_sae import np_encode

PAGE = str(Path(__file__).parents[1] / "app" / "views" / "sae_features.py")
HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def sae_store(tmp_path_factory) -> Path:
    """A store with a trained TopK SAE and a probe run of its features."""
    tmp = tmp_path_factory.mktemp("sae_app")
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    GPT2LMHeadModel(config).save_pretrained(tmp / "gpt2")
    tokenizer.save_pretrained(tmp / "gpt2")
    rng = np.random.default_rng(0)
    words = "the cat dog sat on a mat and ran to house tree red blue big small".split()
    (tmp / "corpus.txt").write_text(
        "\n\n".join(" ".join(rng.choice(words, 30)) for _ in range(200))
    )
    store = tmp / "store"
    cfg = TrainConfig(
        str(tmp / "gpt2"),
        HOOK,
        str(tmp / "corpus.txt"),
        k=4,
        expansion=2,
        tokens=2000,
        batch_size=128,
        seq_len=32,
        model_batch=4,
        buffer_tokens=512,
        heldout_tokens=256,
    )
    row = train_sae(cfg, store, quiet=True)
    config = ProbeConfig(max_tokens=1024, seq_len=32, batch_size=4, saes=[row["path"]])
    probe_model(load_model(str(tmp / "gpt2")), str(tmp / "corpus.txt"), store, config, quiet=True)
    return store


def test_probe_job_with_an_sae_equals_an_independent_encode(sae_store):
    """``ProbeConfig(saes=...)``: stored feature activations equal a numpy TopK encode of plain
    HF hidden states of the stored tokens (position 0 left out, as the probe does)."""
    r = Reader(sae_store)
    run = r.sql("SELECT run_id, config FROM runs WHERE kind = 'probe'").iloc[0]
    assert "sae_feature_acts" in json.loads(run["config"])["probes"]
    (sae_row,) = r.sql("SELECT sae_id, path FROM saes").itertuples()
    w = {n: p.detach().double().numpy() for n, p in load_sae(sae_row.path).named_parameters()}
    tokens = r.sql("SELECT seq_id, pos, token_id FROM tokens ORDER BY seq_id, pos")
    hf = GPT2LMHeadModel.from_pretrained(sae_store.parent / "gpt2").eval()
    seen = []  # block 1's output (HF's last hidden state would have ln_f applied)
    hf.transformer.h[1].register_forward_hook(
        lambda m, args, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    expected = {}
    with torch.no_grad():
        for seq_id, seq in tokens.groupby("seq_id", sort=True):
            hf(torch.tensor(seq["token_id"].to_numpy())[None])
            z = np_encode(seen.pop()[0, 1:].double().numpy(), w, 4)
            for t, f in zip(*np.nonzero(z), strict=True):
                expected[(seq_id, t + 1, f)] = z[t, f]
    got = r.sql("SELECT seq_id, pos, feature, value, sae_id FROM sae_feature_acts")
    assert (got["sae_id"] == sae_row.sae_id).all()
    values = {(g.seq_id, g.pos, g.feature): g.value for g in got.itertuples()}
    assert values.keys() == expected.keys()
    np.testing.assert_allclose([values[k] for k in expected], list(expected.values()), rtol=1e-4)


@pytest.mark.parametrize("hook", ["blocks.1.hook_resid_post", "blocks.0.mlp.hook_post"])
def test_decoder_logits_equal_the_lm_head_times_the_decoder_row(sae_store, hook):
    """Top and bottom 10 tokens of W_U·d (d = W_dec[f], mapped through HF's c_proj weight for
    an SAE on the MLP activations), from the plain HF model's weights."""
    from sparsescope.analysis.sae_metrics import decoder_logits
    from sparsescope.probes.sae import SAE

    folder = sae_store.parent / "gpt2"
    hf = GPT2LMHeadModel.from_pretrained(folder).eval()
    d_in = 32 if "resid" in hook else 4 * 32
    torch.manual_seed(1)
    sae = SAE(d_in, 16, 4, hook)
    got = decoder_logits(load_model(str(folder)), sae, feature=5)
    direction = sae.W_dec[5].detach()
    if "mlp" in hook:
        direction = direction @ hf.transformer.h[0].mlp.c_proj.weight.detach()  # [d_mlp, d]
    logits = hf.lm_head.weight.detach() @ direction
    for side, largest in (("top", True), ("bottom", False)):
        rows = got[got["side"] == side].sort_values("rank")
        values, ids = logits.topk(10, largest=largest)
        assert rows["token_id"].tolist() == ids.tolist(), side
        np.testing.assert_allclose(rows["logit"], values.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "change, model, needle",
    [
        ("hook", "gpt2", "blocks.9.hook_resid_post, which"),  # a hook the model lacks
        (None, "minilm", "reads 32 values at blocks.1.hook_resid_post, where minilm has 384"),
        ("weights", "gpt2", "cannot be read"),  # a corrupt safetensors file
    ],
)
def test_a_bad_sae_is_refused_in_one_line(sae_store, tmp_path, change, model, needle):
    (path,) = Reader(sae_store).sql("SELECT path FROM saes")["path"]
    bad = tmp_path / "sae"
    shutil.copytree(path, bad)
    if change == "hook":
        cfg = json.loads((bad / "cfg.json").read_text())
        (bad / "cfg.json").write_text(json.dumps({**cfg, "hook_name": "blocks.9.hook_resid_post"}))
    elif change == "weights":
        (bad / "sae_weights.safetensors").write_bytes(b"garbage")
    model = str(sae_store.parent / "gpt2") if model == "gpt2" else model
    before = fingerprint(sae_store)
    result = run_cli("probe", "--model", model, "--store", str(sae_store), "--sae", str(bad),
                     "--max-tokens", "64")  # fmt: skip
    assert result.returncode == 2 and needle in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert fingerprint(sae_store) == before


def _app(monkeypatch, store: Path) -> AppTest:
    monkeypatch.setenv(STORE_ENV, str(store))
    return AppTest.from_file(PAGE, default_timeout=120)


def test_empty_store_gets_a_message(monkeypatch, empty_store):
    at = _app(monkeypatch, empty_store).run()
    assert not at.exception
    assert "No SAEs in this store" in at.info[0].value


def test_page_shows_saes_contexts_token_features_and_logits(monkeypatch, sae_store):
    r = Reader(sae_store)
    top = r.sql(
        "SELECT feature, count(*) AS n FROM sae_feature_acts GROUP BY feature"
        " ORDER BY n DESC, feature LIMIT 1"
    ).iloc[0]
    at = _app(monkeypatch, sae_store).run()
    assert not at.exception
    assert at.title[0].value == "SAE features"
    table = at.dataframe[0].value
    assert table["arch"].tolist() == ["topk"] and {"l0", "fvu", "ce_recovered"} <= set(table)
    at.number_input(key="sae_feature").set_value(int(top["feature"])).run()
    assert not at.exception
    probed = int(r.sql("SELECT count(*) AS n FROM tokens WHERE pos >= 1")["n"].iloc[0])
    assert at.metric[0].value == f"{int(top['n']):,} of {probed:,}"  # position 0 is not probed
    best = r.sql(
        "SELECT a.seq_id, a.pos, a.value FROM sae_feature_acts a"
        " WHERE a.feature = ? ORDER BY a.value DESC, a.seq_id, a.pos LIMIT 1",
        [int(top["feature"])],
    ).iloc[0]
    html = at.get("html")[0].proto.body
    assert f"{best['value']:.3f} · seq {int(best['seq_id'])} pos {int(best['pos'])}" in html
    expected = r.sql(
        "SELECT feature, value FROM sae_feature_acts WHERE seq_id = ? AND pos = ?"
        " ORDER BY value DESC",
        [int(best["seq_id"]), int(best["pos"])],
    )
    active = at.dataframe[1].value
    assert active["feature"].tolist() == expected["feature"].tolist()
    assert int(top["feature"]) in active["feature"].tolist()
    at.button(key="sae_logits").click().run()
    assert not at.exception
    assert len(at.dataframe) == 5 and len(at.dataframe[3].value) == 10  # after the lifts
