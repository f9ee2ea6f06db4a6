"""Metrics at checkpoints (`t2i train --eval-every`, `--keep-best`): FD/KID/precision/recall/R@k on
the held-out split in metrics.jsonl and the card, and the best checkpoints kept across a SIGKILLed
worker and a resumed run."""

from __future__ import annotations

import json

import pytest
from test_train_ray import _lines, worker_killed_past

from pipelines.cli import main as cli
from t2i import checkpoint as ck
from t2i import storage
from t2i.config import EncoderSpec, to_dict
from t2i.data import shapes
from t2i.data.embedded import write_arrays
from t2i.errors import ConfigError
from t2i.registry import Registry
from t2i.text import TextEncoder
from t2i.train.evaluation import best_steps
from t2i.train.run import make_job, resolve_model


@pytest.fixture(scope="module")
def dataset(tmp_path_factory, tiny_encoders):
    """256 shapes samples at 16 px, a quarter held out, and our feature model fitted on the rest."""
    root = tmp_path_factory.mktemp("train-eval")
    images, captions, _ = shapes.make_arrays(256, 16, seed=3)
    enc = TextEncoder(EncoderSpec(name=tiny_encoders["encoder"], kind="encoder", max_tokens=16))
    out = enc.encode(captions)
    data = str(root / "emb")
    manifest = write_arrays(data, images=images, captions=captions, tokens=out.tokens, pooled=out.pooled,
                            encoder=to_dict(enc.spec), keys=[f"k{i:05d}" for i in range(256)], holdout=0.25)
    features = str(root / "features")
    assert cli(["eval", "fit-features", "--data", data, "--out", features, "--steps", "40", "--batch-size", "32"]) == 0
    return data, features, manifest


def test_keep_best_across_a_worker_kill_and_a_resume(ray_cluster, dataset, tmp_path):
    from pipelines.train import train

    data, features, manifest = dataset
    run, reg = str(tmp_path / "run"), str(tmp_path / "registry")
    opts = dict(batch_size=16, log_every=2, checkpoint_every=2, keep=2, keep_best="fd", eval_features=features,
                eval_n=32)
    train(data, "flow-debug", run, workers=2, steps=6, **opts)
    with worker_killed_past(run, 10, rank=1) as killed:
        second = train(data, "flow-debug", run, workers=2, steps=16, max_failures=1, register="m", registry=reg,
                       **opts)
    assert killed and second["step"] == 16 and second["attempt"] == 2

    evals = {r["step"]: r for r in _lines(storage.url_join(run, "metrics.jsonl")) if "eval_fd" in r}
    assert sorted(evals) == list(range(2, 17, 2))  # every checkpoint scored once (redone steps replace theirs)
    for r in evals.values():
        assert r["eval_fd"] > 0 and 0 <= r["eval_precision"] <= 1 and 0 <= r["eval_r_at_5"] <= 1
    best = best_steps("fd", 2, evals)
    kept = {step for step, _ in ck.list_checkpoints(run)}
    assert kept == best, (kept, {s: r["eval_fd"] for s, r in evals.items()})  # exactly the 2 best: the run finished

    top = max(best_steps("fd", 1, evals))  # registered: the best checkpoint, not the last
    meta = json.loads(storage.read_bytes(storage.url_join(run, "checkpoints", f"step_{top:06d}", "meta.json")))
    card = Registry(reg).show("m")
    feature_digest = json.loads(storage.read_text(storage.url_join(features, "card.json")))["digest"]
    assert meta["metrics"]["eval_fd"] == evals[top]["eval_fd"] == card["metrics"]["eval_fd"]
    assert card["step"] == top
    assert card["eval"]["eval_features"]["digest"] == feature_digest and card["eval"]["eval_split"] == "heldout"
    assert card["eval"]["eval_n"] == 32 <= manifest["heldout"]["rows"]


def test_eval_option_rules(dataset, tmp_path):
    data, features, manifest = dataset

    def resolve(**kw):
        return resolve_model(make_job(data=data, model="flow-debug", out=str(tmp_path / "r"), **kw), manifest)

    with pytest.raises(ConfigError, match="need --eval-features"):
        resolve(eval_every=4)
    with pytest.raises(ConfigError, match="--keep-best 'loss': expected one of fd, kid"):
        resolve(keep_best="loss", eval_features=features)
    with pytest.raises(ConfigError, match="--eval-every 3 must be a multiple of --checkpoint-every 2"):
        resolve(eval_every=3, checkpoint_every=2, eval_features=features)
    with pytest.raises(ConfigError, match="--keep-best scores every checkpoint"):
        resolve(eval_every=4, checkpoint_every=2, keep_best="fd", eval_features=features)
    resolve(eval_every=4, checkpoint_every=2, eval_features=features)


def test_a_missing_feature_model_is_one_line_before_ray(dataset, tmp_path, capsys):
    data, _, _ = dataset
    rc = cli(["train", "--data", data, "--model", "flow-debug", "--out", str(tmp_path / "run"), "--eval-every", "2",
              "--checkpoint-every", "2", "--eval-features", str(tmp_path / "nope")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and str(tmp_path / "nope") in err[0] and "Traceback" not in err[0], err
