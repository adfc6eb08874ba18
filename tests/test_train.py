"""train.py end to end: CLI, training, saving, resume, export to a real Redis, notebook helper, README snippet."""
import json
import os
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import redis
import torch

import demo_data
import evaluate
import model_io
import redis_servers
import train
from real_samples import real_sample

ROOT = Path(__file__).resolve().parent.parent
USERBEHAVIOR = real_sample("Haohanblue__UserBehavior.csv")

# A model small enough to train in seconds on 2 cores, with every part present.
TINY = ["--item_embedding_dim", "16", "--category_embedding_dim", "8", "--width", "16", "--hidden_dim", "8",
        "--depth", "1", "--heads", "2", "--head_dim", "8", "--moe_experts", "4", "--moe_activated", "2",
        "--moe_hidden", "16", "--n_min", "8", "--n_max", "24", "--k_min", "2", "--k_max", "6",
        "--batch_size", "64", "--epochs", "1", "--export_batch_size", "128", "--no-progress"]


@pytest.fixture(scope="module")
def demo_log(tmp_path_factory):
    path = tmp_path_factory.mktemp("log") / "tianchi_mobile_recommend_train_user.csv"
    demo_data.write_log(path, n_users=120, n_days=10, seed=3)
    return path


@pytest.fixture(scope="module")
def trained(demo_log, redis_server, tmp_path_factory):
    """One short training run on the demo log, published to the shared test server under a prefix."""
    save_dir = tmp_path_factory.mktemp("saved")
    r = redis.Redis.from_url(redis_server)
    r.set("foreign:1", "keep me")
    r.set("e2e:not-ours", "keep me too")
    code = train.main(["--data_path", str(demo_log), "--save_dir", str(save_dir), "--redis_url", redis_server,
                       "--redis_prefix", "e2e:", *TINY])
    assert code == 0
    return save_dir, redis_server


def test_end_to_end_vectors_read_back_from_redis(trained):
    save_dir, url = trained
    user_ids, vectors, version = model_io.load_vectors(save_dir)
    assert len(user_ids) == 120 and vectors.shape == (120, 8) and vectors.dtype == np.float32
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-4)
    r = redis.Redis.from_url(url)
    for uid, vec in zip(user_ids, vectors):
        got = json.loads(r.get(f"e2e:{uid}"))
        assert np.allclose(got, vec, atol=1e-6)
    assert r.get("foreign:1") == b"keep me" and r.get("e2e:not-ours") == b"keep me too"
    assert version == model_io.read_config(save_dir)["model_version"]


def test_saved_files_and_notebook_helper_reproduce_exported_vectors(trained):
    save_dir, _ = trained
    for name in model_io.MODULE_NAMES:
        state = torch.load(save_dir / f"{name}.pth")  # the seed's notebook line, as written
        assert isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
    model, vocab, config = model_io.load_model(save_dir)
    assert not model.training and config["train"]["epochs"] == 1
    user_ids, vectors, _ = model_io.load_vectors(save_dir)
    import data
    events, _ = data.read_events(config["train"]["data_path"], progress=False)
    seqs = data.build_sequences(events, vocab)
    import inference
    again = inference.compute_user_vectors(model, seqs, part="all", min_len=8, max_len=24, progress=False)
    assert np.array_equal(seqs.user_ids, user_ids)
    assert np.allclose(again, vectors, atol=1e-5)


def test_history_records_losses_and_expert_balance(trained):
    save_dir, _ = trained
    config = model_io.read_config(save_dir)
    (rec,) = config["history"]
    assert np.isfinite(rec["train_loss"]) and np.isfinite(rec["val_loss"]) and 0 < rec["val_mrr"] <= 1
    assert len(rec["moe"]["load"]) == 4 and sum(rec["moe"]["load"]) > 0


def test_userbehavior_sample_end_to_end(redis_server, tmp_path):
    r = redis.Redis.from_url(redis_server)
    code = train.main(["--data_path", str(USERBEHAVIOR), "--save_dir", str(tmp_path), "--redis_url", redis_server,
                       "--redis_prefix", "ub:", "--redis_format", "f32", *TINY])
    assert code == 0
    user_ids, vectors, _ = model_io.load_vectors(tmp_path)
    assert len(user_ids) == 815
    got = np.stack([np.frombuffer(r.get(f"ub:{u}"), "<f4") for u in user_ids])
    assert np.array_equal(got, vectors)


def test_resume_equals_uninterrupted_run(demo_log, tmp_path):
    common = ["--data_path", str(demo_log), "--no_redis", "--no-evaluate", *TINY]
    assert train.main([*common, "--save_dir", str(tmp_path / "a"), "--epochs", "2"]) == 0
    assert train.main([*common, "--save_dir", str(tmp_path / "b"), "--epochs", "1"]) == 0
    assert train.main([*common, "--save_dir", str(tmp_path / "b"), "--epochs", "2", "--resume"]) == 0
    a = torch.load(tmp_path / "a" / model_io.CHECKPOINT_FILE, weights_only=False)
    b = torch.load(tmp_path / "b" / model_io.CHECKPOINT_FILE, weights_only=False)
    assert a["epoch"] == b["epoch"] == 2
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]
    va, vb = model_io.load_vectors(tmp_path / "a")[1], model_io.load_vectors(tmp_path / "b")[1]
    assert np.array_equal(va, vb)


def test_resume_refuses_changed_settings(demo_log, tmp_path):
    common = ["--data_path", str(demo_log), "--no_redis", "--no-evaluate", "--save_dir", str(tmp_path), *TINY]
    assert train.main(common) == 0
    with pytest.raises(SystemExit, match="--width"):
        train.main([*common, "--resume", "--epochs", "2", "--width", "32"])
    # a checkpoint from before a setting existed was made with the old behaviour, not today's default
    ckpt_path = tmp_path / model_io.CHECKPOINT_FILE
    ckpt = torch.load(ckpt_path, weights_only=False)
    del ckpt["config"]["exact_categories"]
    torch.save(ckpt, ckpt_path)
    with pytest.raises(SystemExit, match=r"--exact_categories False \(now True\)"):
        train.main([*common, "--resume", "--epochs", "2"])


def test_unreachable_redis_keeps_vectors_and_republish_completes(demo_log, tmp_path, monkeypatch):
    port = redis_servers.free_port()
    url = f"redis://127.0.0.1:{port}"
    common = ["--save_dir", str(tmp_path), "--redis_url", url, "--no-evaluate", *TINY]
    server = redis_servers.start_test_server(port=port)  # answers the check before training ...
    publish = train.publish

    def server_gone_by_now(*args, **kwargs):  # ... and is gone when the vectors are ready
        server.stop()
        return publish(*args, **kwargs)

    monkeypatch.setattr(train, "publish", server_gone_by_now)
    code = train.main(["--data_path", str(demo_log), *common])
    assert code == train.EXIT_REDIS
    monkeypatch.undo()
    user_ids, vectors, _ = model_io.load_vectors(tmp_path)  # safe on disk
    server = redis_servers.start_test_server(port=port)
    try:
        assert train.main(["--republish", *common]) == 0
        r = redis.Redis.from_url(url)
        assert json.loads(r.get(str(user_ids[-1]))) == pytest.approx(vectors[-1].tolist(), abs=1e-6)
    finally:
        server.stop()


def test_category_idf_is_counted_on_training_users_saved_and_reloaded(demo_log, tmp_path):
    import data
    import inference
    assert train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path), "--no_redis", "--category_idf", "0.5",
                       *TINY]) == 0
    model, vocab, config = model_io.load_model(tmp_path)
    assert config["model"]["category_idf"] == 0.5
    events, _ = data.read_events(str(demo_log), progress=False)
    history = data.split_last_day(events)[0]                  # what the run trained on
    seqs = data.build_sequences(history, vocab)
    run = types.SimpleNamespace(**{k: config["train"][k] for k in ("seed", "test_fraction", "val_fraction", "evaluate")})
    users, val, test = train.split_users(seqs, run)
    want = np.zeros(vocab.n_categories, np.int64)             # users per category, brute force
    for u in users:
        want[np.unique(seqs.category[seqs.offsets[u]:seqs.offsets[u + 1]])] += 1
    assert np.array_equal(train.category_users(seqs, users, vocab.n_categories), want)
    # the saved scale: the smoothed IDF over the training users alone (not the validation or held-out ones)
    idf = np.log((1.0 + len(users)) / (1.0 + want)) + 1.0
    assert len(val) and len(test)
    np.testing.assert_allclose(model.feature_embedding.category_scale.numpy(), idf ** 0.5, rtol=1e-6)
    # it travels with the weights: the reloaded model gives the exported vectors, and without it they differ
    everyone = data.build_sequences(events, vocab)
    exported = model_io.load_vectors(tmp_path)[1]
    again = inference.compute_user_vectors(model, everyone, part="all", min_len=8, max_len=24, progress=False)
    assert np.allclose(again, exported, atol=1e-5)
    model.feature_embedding.category_scale.fill_(1.0)
    plain = inference.compute_user_vectors(model, everyone, part="all", min_len=8, max_len=24, progress=False)
    assert not np.allclose(plain, exported, atol=1e-3)


def test_export_only_embeds_a_newer_log_with_the_saved_vocabulary(trained, tmp_path):
    save_dir, _ = trained
    newer = tmp_path / "newer.csv"
    demo_data.write_log(newer, n_users=30, n_days=5, seed=99)  # other users, mostly unseen items
    work = tmp_path / "saved"
    shutil.copytree(save_dir, work)
    assert train.main(["--export_only", "--data_path", str(newer), "--save_dir", str(work), "--no_redis",
                       "--no-progress"]) == 0
    user_ids, vectors, version = model_io.load_vectors(work)
    assert len(user_ids) == 30 and np.isfinite(vectors).all()
    assert version == model_io.read_config(save_dir)["model_version"]


def export_with_and_without_cache(save_dir, log, tmp_path, capsys) -> tuple[dict, np.ndarray]:
    """--export_only of `log` from copies of save_dir, with --cache and with --no-cache; asserts the two
    exports are equal bit for bit. -> ({flag: its stdout}, the exported user ids)."""
    out, vectors = {}, {}
    for flag in ("--cache", "--no-cache"):
        work = tmp_path / flag
        shutil.copytree(save_dir, work)
        capsys.readouterr()
        assert train.main(["--export_only", "--data_path", str(log), "--save_dir", str(work), "--no_redis",
                           "--no-progress", flag]) == 0
        out[flag] = capsys.readouterr().out
        vectors[flag] = model_io.load_vectors(work)[:2]
    assert np.array_equal(vectors["--cache"][0], vectors["--no-cache"][0])
    assert np.array_equal(vectors["--cache"][1], vectors["--no-cache"][1])
    return out, vectors["--cache"][0]


def test_export_only_reuses_the_event_cache_and_exports_what_the_csv_gives(trained, demo_log, tmp_path, capsys):
    """The training run cached the log; --export_only reuses it (no parse) and its vectors equal a --no-cache
    export bit for bit; evaluate.py's CLI reuses it too."""
    save_dir, _ = trained
    out, _ = export_with_and_without_cache(save_dir, demo_log, tmp_path, capsys)
    assert "event cache: reusing" in out["--cache"] and "event cache: reusing" not in out["--no-cache"]
    assert "event cache: building" not in out["--cache"] + out["--no-cache"]
    assert evaluate.main(["--save_dir", str(save_dir), "--data_path", str(demo_log), "--no-progress"]) == 0
    assert "event cache: reusing" in capsys.readouterr().out


def test_daily_refresh_parses_only_the_new_day_and_exports_what_the_csv_gives(trained, demo_log, tmp_path, capsys):
    """The daily refresh: yesterday's log is cached; today it has one more day (new users too) appended.
    --export_only updates the cache from the appended lines only, and its vectors equal a --no-cache export."""
    save_dir, _ = trained
    lines = demo_log.read_text().splitlines(keepends=True)
    last_day = max(line.rsplit(",", 1)[1][:10] for line in lines[1:])
    extra = [f"{900000 + i},{i},1,,5,{last_day} 07\n" for i in range(3)]   # users the log did not have
    log = tmp_path / "log" / demo_log.name
    log.parent.mkdir()
    log.write_text(lines[0] + "".join(line for line in lines[1:] if not line.rsplit(",", 1)[1].startswith(last_day)))
    work = tmp_path / "yesterday"
    shutil.copytree(save_dir, work)
    assert train.main(["--export_only", "--data_path", str(log), "--save_dir", str(work), "--no_redis",
                       "--no-progress"]) == 0                      # builds the cache of yesterday's log
    with open(log, "a") as f:
        f.writelines([line for line in lines[1:] if line.rsplit(",", 1)[1].startswith(last_day)] + extra)
    out, user_ids = export_with_and_without_cache(save_dir, log, tmp_path, capsys)
    assert "event cache: updating" in out["--cache"] and "event cache: updated" in out["--cache"]
    assert "building" not in out["--cache"]
    assert {900000, 900001, 900002} <= set(user_ids.tolist())


def test_redis_password_is_in_no_output_and_no_saved_file(demo_log, tmp_path, capsys):
    server = redis_servers.start_test_server(args=("--requirepass", "s3cretpw"))
    url = f"redis://:s3cretpw@127.0.0.1:{server.port}/0"
    try:
        assert train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path), "--redis_url", url,
                           "--redis_prefix", "sec:", *TINY]) == 0
        r = redis.Redis.from_url(url)
        stored = b"".join(r.get(k) for k in r.keys("sec:__*"))  # the metadata keys this run wrote
    finally:
        server.stop()
    assert b"\"version\"" in stored and b"s3cretpw" not in stored
    out = capsys.readouterr()
    assert "s3cretpw" not in out.out + out.err
    masked = f"redis://:***@127.0.0.1:{server.port}/0"
    assert masked in out.out  # still says which server was meant
    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert {"config.json", model_io.CHECKPOINT_FILE, model_io.VECTORS_FILE} <= {p.name for p in files}
    for path in files:
        assert b"s3cretpw" not in path.read_bytes(), path
    assert model_io.read_config(tmp_path)["train"]["redis_url"] == masked


def test_torn_save_leaves_previous_file_intact(tmp_path, monkeypatch):
    path = tmp_path / "long_term.pth"
    model_io.atomic_torch_save({"w": torch.ones(3)}, path)

    def crash(obj, f):
        f.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        model_io.atomic_torch_save({"w": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert torch.equal(torch.load(path)["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["long_term.pth"]


def test_save_interrupted_between_weight_files_is_refused_never_mixed(trained, demo_log, tmp_path, monkeypatch):
    work = tmp_path / "saved"
    shutil.copytree(trained[0], work)
    new_model, vocab, _ = model_io.load_model(work)
    with torch.no_grad():
        for p in new_model.parameters():
            p.add_(1.0)  # another run's weights
    writes = []
    save = model_io.atomic_torch_save

    def killed_after_two(obj, path):
        if len(writes) == 2:
            raise KeyboardInterrupt  # SIGINT/SIGKILL between the second and third weight file
        writes.append(path)
        save(obj, path)

    monkeypatch.setattr(model_io, "atomic_torch_save", killed_after_two)
    with pytest.raises(KeyboardInterrupt):
        model_io.save_model(work, new_model, vocab, {})
    monkeypatch.undo()
    assert [p.name for p in writes] == ["feature_embedding.pth", "moe_layer.pth"]
    with pytest.raises(model_io.ModelSetError, match=r"feature_embedding\.pth, moe_layer\.pth do not match "
                                                     r"config\.json .* --resume"):
        model_io.load_model(work)
    with pytest.raises(SystemExit, match=r"^error: .* is not one consistent model"):
        train.main(["--export_only", "--data_path", str(demo_log), "--save_dir", str(work), "--no_redis"])
    # the repair the message names: --resume finds the finished run in checkpoint.pt and saves the set again
    assert train.main(["--data_path", str(demo_log), "--save_dir", str(work), "--no_redis", "--resume", *TINY]) == 0
    model, _, config = model_io.load_model(work)
    assert config["model_version"].split("-")[1] == model_io.read_config(trained[0])["model_version"].split("-")[1]


def test_second_run_on_a_save_dir_in_use_fails_at_once(demo_log, tmp_path, monkeypatch):
    held = model_io.lock_save_dir(tmp_path)  # a first run, still training
    monkeypatch.setattr(train.data, "read_events", lambda *a, **k: pytest.fail("read the log before failing"))
    try:
        with pytest.raises(SystemExit, match=rf"--save_dir {tmp_path} is in use by pid {os.getpid()}"):
            train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path), "--no_redis", *TINY])
    finally:
        held.close()
    monkeypatch.undo()
    assert train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path), "--no_redis", *TINY]) == 0


def test_unwritable_save_dir_and_wrong_redis_password_fail_before_reading_the_log(demo_log, tmp_path, monkeypatch):
    monkeypatch.setattr(train.data, "read_events", lambda *a, **k: pytest.fail("read the log before failing"))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit, match=r"--save_dir .*a_file/saved: cannot write there"):
        train.main(["--data_path", str(demo_log), "--save_dir", str(blocker / "saved"), "--no_redis", *TINY])
    server = redis_servers.start_test_server(args=("--requirepass", "right"))
    try:
        url = f"redis://:wrong@127.0.0.1:{server.port}/0"
        with pytest.raises(SystemExit, match=r"refused the credentials .* Nothing was read or trained") as e:
            train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path / "s"), "--redis_url", url, *TINY])
        assert "wrong" not in str(e.value)
        with pytest.raises(SystemExit, match=r"invalid Redis URL"):
            train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path / "s"), "--redis_url",
                        "http://x", *TINY])
    finally:
        server.stop()


def test_missing_model_and_ctrl_c_are_one_clear_line(demo_log, tmp_path, monkeypatch, capsys):
    empty = tmp_path / "empty"
    for flags in (["--export_only"], ["--republish", "--redis_url", "redis://127.0.0.1:1/0"]):
        with pytest.raises(SystemExit, match=r"empty/(config\.json|user_vectors\.npz) not found") as e:
            train.main(["--data_path", str(demo_log), "--save_dir", str(empty), "--no_redis", *flags, *TINY])
        assert e.value.code.startswith("error: ")          # one error line, no traceback
    real, calls = train.train_epoch, []

    def interrupted_in_epoch_2(*a, **k):                    # Ctrl-C while epoch 2 trains
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(train, "train_epoch", interrupted_in_epoch_2)
    save = tmp_path / "s"
    args = ["--data_path", str(demo_log), "--save_dir", str(save), "--no_redis", *TINY, "--epochs", "2"]
    with pytest.raises(SystemExit) as e:
        train.main(args)
    assert e.value.code == 130
    err = capsys.readouterr().err
    assert "interrupted" in err and "checkpoint.pt holds the last finished epoch" in err and "--resume" in err
    assert not (save / model_io.CONFIG_FILE).exists()      # no model set from a run that did not finish
    monkeypatch.setattr(train, "train_epoch", real)
    assert train.main([*args, "--resume"]) == 0            # the hint works: the run finishes from epoch 1
    assert model_io.load_model(save)
    calls[:] = [1]                                         # the next call is interrupted: its epoch 1
    monkeypatch.setattr(train, "train_epoch", interrupted_in_epoch_2)
    with pytest.raises(SystemExit):                        # a new run stopped before its first checkpoint:
        train.main([*args, "--seed", "7"])                 # the folder's checkpoint is the earlier run's
    err = capsys.readouterr().err
    assert "interrupted" in err and "checkpoint.pt" not in err


def test_non_finite_loss_stops_with_clear_message(demo_log, tmp_path, monkeypatch):
    real = train.batch_loss

    def nan_loss(*args):
        loss, metrics = real(*args)
        return loss * float("nan"), metrics

    monkeypatch.setattr(train, "batch_loss", nan_loss)
    with pytest.raises(SystemExit, match="loss became nan .* no weights were written"):
        train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path), "--no_redis", *TINY])
    assert not (tmp_path / "long_term.pth").exists()


def test_non_finite_loss_keeps_last_good_weights(demo_log, tmp_path, monkeypatch):
    real = train.train_epoch

    def flaky(model, opts, seqs, users, cfg, device, epoch, *rest):
        if epoch == 1:
            raise train.NonFiniteLoss("loss became nan at epoch 2, step 1")
        return real(model, opts, seqs, users, cfg, device, epoch, *rest)

    monkeypatch.setattr(train, "train_epoch", flaky)
    with pytest.raises(SystemExit, match="last good weights \\(epoch 1\\)"):
        train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path), "--no_redis", *TINY,
                    "--epochs", "3"])
    model, _, _ = model_io.load_model(tmp_path)
    ckpt = torch.load(tmp_path / model_io.CHECKPOINT_FILE, weights_only=False)
    assert ckpt["epoch"] == 1
    for key, value in model.long_term.state_dict().items():
        assert torch.equal(value, ckpt["best"]["state"][f"long_term.{key}"])


def test_non_finite_validation_loss_is_never_best_and_exports_nothing(demo_log, tmp_path, monkeypatch):
    real = train.validate

    def nan_validation(*args, **kw):
        return {**real(*args, **kw), "val_loss": float("nan")}

    monkeypatch.setattr(train, "validate", nan_validation)
    with pytest.raises(SystemExit, match="validation loss became nan at epoch 1.*no weights were written.*"
                                         "learning rate is likely too high"):
        train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path), "--no_redis", *TINY])
    assert not (tmp_path / "long_term.pth").exists() and not (tmp_path / model_io.VECTORS_FILE).exists()


def test_non_finite_weights_stop_on_the_last_good_epoch(demo_log, tmp_path, monkeypatch):
    real = train.train_epoch

    def poisoned(model, opts, seqs, users, cfg, device, epoch, *rest):
        out = real(model, opts, seqs, users, cfg, device, epoch, *rest)
        if epoch == 1:  # a finite loss, but a weight blew up in the last step
            with torch.no_grad():
                model.long_term.parameters().__next__().fill_(float("inf"))
        return out

    monkeypatch.setattr(train, "train_epoch", poisoned)
    with pytest.raises(SystemExit, match="weight tensor.*NaN or inf.*at epoch 2.*last good weights \\(epoch 1\\)"):
        train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path), "--no_redis", "--no-evaluate",
                    "--val_fraction", "0", *TINY, "--epochs", "3"])  # no validation: the weights alone tell
    model, _, config = model_io.load_model(tmp_path)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(config["history"]) == 1 and not (tmp_path / model_io.VECTORS_FILE).exists()


def test_non_finite_vectors_are_not_written_to_disk(demo_log, tmp_path, monkeypatch):
    real = train.distributed.sharded_user_vectors

    def nan_export(model, seqs, users, *args, **kw):
        out = real(model, seqs, users, *args, **kw)
        if users is None:  # the export, not the validation
            out[::7] = np.nan
        return out

    monkeypatch.setattr(train.distributed, "sharded_user_vectors", nan_export)
    with pytest.raises(SystemExit, match="user vectors hold NaN or inf; nothing was written"):
        train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path), "--no_redis", "--no-evaluate", *TINY])
    assert not (tmp_path / model_io.VECTORS_FILE).exists()


@pytest.mark.parametrize("flag", ["--lr", "--tau", "--dropout", "--val_fraction", "--test_fraction"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_numeric_flags_are_refused(flag, value, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args([f"{flag}={value}"])
    assert exc.value.code == 2
    assert f"{flag} must be a finite number" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["--no_such_flag"], "unrecognized arguments"),
    (["--epochs", "0"], "--epochs must be > 0"),
    (["--loss", "hinge"], "invalid choice"),
    (["--n_min", "50", "--n_max", "20"], "--n_min"),
    (["--moe_activated", "9", "--moe_experts", "4"], "--moe_activated"),
    (["--val_fraction", "1.5"], "--val_fraction"),
    (["--category_dim", "64", "--hidden_dim", "64"], "--category_dim (64) must be below --hidden_dim (64)"),
])
def test_bad_flags_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as exc:
        train.parse_args(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_missing_data_path_names_it(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(SystemExit, match="^error: " + re.escape(str(missing))):
        train.main(["--data_path", str(missing), "--save_dir", str(tmp_path), "--no_redis", *TINY])


def test_bad_input_is_one_error_line_without_traceback(tmp_path):
    log = tmp_path / "log.csv.gz"
    log.write_bytes(b"\x1f\x8b\x08\x00" + bytes(range(256)) * 8)   # a damaged .gz
    run = subprocess.run([sys.executable, str(ROOT / "train.py"), "--data_path", str(log), "--save_dir",
                          str(tmp_path / "saved"), "--no_redis", *TINY], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"error: {log}: damaged compressed input")
    flag = subprocess.run([sys.executable, str(ROOT / "train.py"), "--lr", "nan"], capture_output=True, text=True,
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert flag.returncode == 2 and "Traceback" not in flag.stderr and "--lr must be a finite number" in flag.stderr


@pytest.mark.parametrize("read", ["--no-cache", "--rebuild_cache"])   # read_events, or the event cache's build
def test_bugs_keep_their_traceback(demo_log, tmp_path, monkeypatch, read):
    def bug(*args, **kw):
        raise KeyError("a bug, not bad input")

    monkeypatch.setattr(train.data, "stream_events", bug)
    with pytest.raises(KeyError, match="a bug"):
        train.main(["--data_path", str(demo_log), "--save_dir", str(tmp_path), "--no_redis", read, *TINY])


def test_readme_documents_every_flag():
    text = (ROOT / "README.md").read_text()
    for name in train._constants():
        assert f"`--{name.lower()}`" in text, name


@pytest.mark.parametrize("line, message", [
    ("NEW_FLAG = 5\n", "NEW_FLAG has no comment"),
    ("NEW_FLAG = 5  #  \n", "NEW_FLAG has no comment"),
    ("NEW_FLAG = 5  # a number nobody checks\n", "NEW_FLAG has no entry in CHECKS"),
    ("NEW_FLAG = True  # a switch nobody placed\n", "NEW_FLAG is in neither of RESUME_KEYS and RUN_ONLY"),
])
def test_a_constant_without_help_or_check_is_an_error_not_a_silent_flag(tmp_path, line, message):
    help_fails_with(tmp_path, "PROGRESS = True", line + "PROGRESS = True", message)


def test_a_constant_in_both_resume_tables_is_an_error(tmp_path):
    help_fails_with(tmp_path, '"no_redis", "progress")', '"no_redis", "progress", "seed")',
                    "SEED is in both of RESUME_KEYS and RUN_ONLY")


def help_fails_with(tmp_path, old, new, message):
    """train.py --help with `old` replaced by `new` in its source exits non-zero saying `message`."""
    assert old in (ROOT / "train.py").read_text()
    src = (ROOT / "train.py").read_text().replace(old, new, 1)
    (tmp_path / "train.py").write_text(src)
    run = subprocess.run([sys.executable, str(tmp_path / "train.py"), "--help"], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert run.returncode != 0 and message in run.stderr


def test_help_lists_every_constant():
    out = subprocess.run([sys.executable, str(ROOT / "train.py"), "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for name in train._constants():
        assert f"--{name.lower()}" in out


def test_readme_reading_snippet_runs_as_written(trained, monkeypatch):
    """The README's reader, executed verbatim; only redis.Redis()'s default port points at the test server."""
    save_dir, url = trained
    text = (ROOT / "README.md").read_text()
    snippet = re.search(r"<!-- reader-snippet -->\s*```python\n(.*?)```", text, re.S).group(1)
    user_ids, vectors, _ = model_io.load_vectors(save_dir)
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    shim = types.ModuleType("redis")
    shim.Redis = lambda host="localhost", port_=port, **kw: redis.Redis(host=host, port=port_, **kw)
    monkeypatch.setitem(sys.modules, "redis", shim)
    r = redis.Redis(port=port)
    r.set(str(user_ids[0]), r.get(f"e2e:{user_ids[0]}"))  # the README reads the default, unprefixed layout
    namespace = {"user_id": str(user_ids[0])}
    exec(snippet, namespace)
    assert np.allclose(namespace["vector"], vectors[0], atol=1e-6)
    r.delete(str(user_ids[0]))


def test_training_run_writes_evaluation_and_report(trained):
    save_dir, _ = trained
    config = model_io.read_config(save_dir)
    heldout = config["eval"]["heldout_users"]
    assert len(heldout) >= 2
    metrics = json.loads((save_dir / "metrics.json").read_text())
    assert metrics  # the evaluation's own tests check its content
    for name in ("report_loss.png", "report_experts.png", "report_users.png"):
        assert (save_dir / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_epoch_batches_cover_every_user_once_with_length_buckets():
    rng = np.random.default_rng(0)
    lengths = rng.integers(2, 500, 1000)
    users = np.arange(3, 1000)
    batches = train.epoch_batches(users, lengths, 64, np.random.default_rng(1))
    assert sorted(np.concatenate(batches).tolist()) == users.tolist()
    assert all(2 <= len(b) <= 64 for b in batches)
    # bucketing: a batch's lengths spread far less than a random batch's
    spread = np.median([np.ptp(lengths[b]) for b in batches])
    assert spread < 0.5 * np.ptp(lengths)
    assert len(train.epoch_batches(np.arange(3), lengths, 64, rng)) == 1


def test_config_saved_before_feature_norm_builds_the_old_model(trained):
    config = model_io.read_config(trained[0])
    assert config["model"]["feature_norm"] is True
    assert hasattr(model_io.build_model(config).feature_embedding, "group_norms")
    del config["model"]["feature_norm"]  # what config.json held before the field existed
    assert not hasattr(model_io.build_model(config).feature_embedding, "group_norms")
    # the [CLS] head of a model from before exact_categories writes the whole vector
    assert model_io.build_model(config).long_term.head.out_features == config["model"]["hidden_dim"] // 2
    del config["model"]["exact_categories"]
    assert model_io.build_model(config).long_term.head.out_features == config["model"]["hidden_dim"]
    # ... and its category half pooled without a recency prior
    assert config["model"]["category_half_life"] == train.CATEGORY_HALF_LIFE > 0
    del config["model"]["category_half_life"]
    assert model_io.build_model(config).cfg.category_half_life == 0.0
    # ... and scored item candidates with their target vectors as trained
    assert config["model"]["item_category_weight"] == train.ITEM_CATEGORY_WEIGHT < 1
    del config["model"]["item_category_weight"]
    assert model_io.build_model(config).cfg.item_category_weight == 1.0
    # ... and pooled every category into it
    assert config["model"]["category_top"] == train.CATEGORY_TOP > 0
    del config["model"]["category_top"]
    assert model_io.build_model(config).cfg.category_top == 0
    # ... and split its vector into two equal halves
    assert config["model"]["category_dim"] == train.CATEGORY_DIM
    del config["model"]["category_dim"]
    old = model_io.build_model(config)
    assert old.cfg.category_size == old.cfg.item_size == config["model"]["hidden_dim"] // 2
    assert old.feature_embedding.target_category.out_features == config["model"]["hidden_dim"] // 2


def _split(user_ids, n_events=None, seed=7, test=0.1, val=0.1, evaluate=True):
    """split_users on sequences holding these raw ids (each with n_events[i] events, default 5)."""
    ids = np.asarray(user_ids, np.int64)
    n = np.full(len(ids), 5) if n_events is None else np.asarray(n_events)
    seqs = types.SimpleNamespace(user_ids=ids, trainable=np.flatnonzero(n >= 2))
    cfg = types.SimpleNamespace(seed=seed, test_fraction=test, val_fraction=val, evaluate=evaluate)
    return [set(ids[part].tolist()) for part in train.split_users(seqs, cfg)]


def test_user_split_is_a_function_of_the_id_and_seed():
    ids = np.sort(np.random.default_rng(0).choice(10**9, 20_000, replace=False))
    tr, va, te = _split(ids)
    assert tr | va | te == set(ids.tolist()) and not (tr & va or tr & te or va & te)
    assert abs(len(te) - 2000) < 200 and abs(len(va) - 2000) < 200
    # any part of the users (a rank's shards, yesterday's log) gives its users the roles they have in the whole
    part = ids[ids % 3 == 1]
    p_tr, p_va, p_te = _split(part)
    assert (p_tr, p_va, p_te) == (tr & set(part.tolist()), va & set(part.tolist()), te & set(part.tolist()))
    grown = np.union1d(ids, np.arange(10**9, 10**9 + 500))
    g_tr, g_va, g_te = _split(grown)
    assert tr <= g_tr and va <= g_va and te <= g_te
    assert _split(ids, seed=8)[2] != te  # another seed holds out other users
    no_eval = _split(ids, evaluate=False)  # no test users: validation takes the lowest hashes, the test users'
    assert no_eval[2] == set() and no_eval[1] == te


def test_user_split_keeps_two_validation_users_and_refuses_too_few():
    tr, va, te = _split(np.arange(12), evaluate=False)
    assert len(va) >= 2 and len(tr) == 12 - len(va)
    assert len(_split(np.arange(12), val=0.0, evaluate=False)[1]) == 0
    tr, va, te = _split(np.arange(6), n_events=[1, 5, 5, 5, 5, 5], evaluate=False)
    assert 0 not in tr | va | te  # one event: no long and short part
    with pytest.raises(SystemExit, match="only 3 user.*fewer than 2 are left"):
        _split(np.arange(3))


def test_precision_auto_takes_bf16_only_where_it_is_native():
    cpu = torch.device("cpu")
    assert train.runtime.resolve_precision("fp32", cpu) == "fp32"
    assert train.runtime.resolve_precision("bf16", cpu) == "bf16"
    assert train.runtime.resolve_precision("auto", torch.device("cuda")) == "bf16"
    for native in (True, False):
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(train.runtime, "cpu_native_bf16", lambda: native)
            assert train.runtime.resolve_precision("auto", cpu) == ("bf16" if native else "fp32")


def test_a_bf16_training_step_runs_the_experts_in_bf16_and_stays_near_fp32(demo_log, monkeypatch):
    import data
    cfg = train.parse_args(["--data_path", str(demo_log), *TINY, "--dropout", "0", "--no-random_cuts"])
    events, _ = data.read_events(str(demo_log), progress=False)
    vocab = data.Vocab.fit(events)
    seqs = data.build_sequences(events, vocab)
    torch.manual_seed(0)
    model = train.build_model(cfg, vocab)
    seen, real = [], torch._grouped_mm
    monkeypatch.setattr(torch, "_grouped_mm", lambda a, b, *args, **kw: seen.append(a.dtype) or real(a, b, *args, **kw))
    users = np.asarray(seqs.trainable)[:32]
    out = {}
    for precision in ("fp32", "bf16"):
        cfg.precision = precision
        seen.clear()
        loss, value = train.batch_forward(model, seqs, users, 3, cfg, torch.device("cpu"))
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        assert all(g.dtype == torch.float32 for g in grads.values())        # the parameters stay fp32
        out[precision] = value, set(seen), torch.cat([(g.to_dense() if g.is_sparse else g).flatten()
                                                     for g in grads.values()])
        model.zero_grad(set_to_none=True)
    assert out["fp32"][1] == {torch.float32} and out["bf16"][1] == {torch.bfloat16}
    assert abs(out["bf16"][0] - out["fp32"][0]) < 0.02 * abs(out["fp32"][0])
    cos = torch.nn.functional.cosine_similarity(out["bf16"][2], out["fp32"][2], dim=0)
    assert cos > 0.99                                                          # the same step, rounded
