"""AppTest of the "SAE features" page: an empty store, and a store with a trained SAE and a
feature-probe run on a tiny random GPT-2 (contexts and logits checked against the store)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from streamlit.testing.v1 import AppTest
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from sparsescope.analysis.sae_train import TrainConfig, train_sae
from sparsescope.app.state import STORE_ENV
from sparsescope.probes import data as data_sources
from sparsescope.probes.batches import batches
from sparsescope.probes.hooks import hooked
from sparsescope.probes.job import TokenNames
from sparsescope.probes.models import load_model, minilm_path
from sparsescope.probes.sae import load_sae
from sparsescope.probes.sae_probe import SaeProbe
from sparsescope.store.reader import Reader
from sparsescope.store.writer import RunWriter

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
    model = load_model(str(tmp / "gpt2"))
    probe = SaeProbe(load_sae(row["path"]), row["sae_id"])
    names = TokenNames(model.tokenizer)
    docs = data_sources.documents(str(tmp / "corpus.txt"))
    with RunWriter(store, "probe", model.model_id, "corpus", {}, "features") as writer:
        n = 0
        with torch.inference_mode(), hooked(model.bridge, probe.hooks()):
            for batch in batches(model.tokenizer, docs, 32, 4, max_tokens=1024):
                ids = batch.input_ids
                probe.start_batch(batch.seq_ids, ids.shape[1])
                model.backbone()(input_ids=ids)
                flat = ids.reshape(-1).numpy()
                writer.write(
                    "tokens",
                    {
                        "seq_id": np.repeat(batch.seq_ids, ids.shape[1]),
                        "pos": np.tile(np.arange(ids.shape[1], dtype=np.int32), len(ids)),
                        "token_id": flat.astype(np.int32),
                        "token": names(flat),
                    },
                )
                writer.write(
                    "sae_feature_acts", pa.Table.from_batches(probe.take_rows()["sae_feature_acts"])
                )
                n += flat.size
        writer.write("sae_feature_stats", probe.feature_stats())
        writer.commit(n, models=[model.info])
    return store


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
    assert at.metric[0].value == f"{int(top['n']):,} of 1,024"
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
    assert len(at.dataframe) == 4 and len(at.dataframe[2].value) == 10
