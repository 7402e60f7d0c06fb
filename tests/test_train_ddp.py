"""lkconv.models.train: end-to-end training with checkpoint + resume, and a 2-process DDP run (gloo, CPU)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from lkconv.models import create_model
from lkconv.models.train import SyntheticPatterns, main

COMMON = ["--model", "tiny", "--num-classes", "3", "--image-size", "32", "--batch-size", "4",
          "--num-samples", "32", "--eval-samples", "8", "--no-progress", "--device", "cpu"]


def _model_sd(path):
    return torch.load(path, map_location="cpu", weights_only=False)["model"]


def test_synthetic_dataset_deterministic_and_labelled():
    a = SyntheticPatterns(10, 3, 16, seed=1)
    b = SyntheticPatterns(10, 3, 16, seed=1)
    x, y = a.batch(range(10))
    x2, y2 = b.batch(range(10))
    assert torch.equal(x, x2) and torch.equal(y, y2)
    assert x.shape == (10, 3, 16, 16) and y.tolist() == [i % 3 for i in range(10)]
    assert not torch.equal(a[0][0], a[3][0])  # same class, different images
    with pytest.raises(ValueError, match="num_classes"):
        SyntheticPatterns(10, 1, 16)


def test_train_main_checkpoint_and_resume(tmp_path, capsys):
    full, half, resumed = (str(tmp_path / n) for n in ("full.pt", "half.pt", "resumed.pt"))
    summ = str(tmp_path / "s.json")
    assert main(COMMON + ["--steps", "3", "--checkpoint", full, "--summary-json", summ]) == 0
    s = json.load(open(summ))
    assert s["steps"] == 3 and s["start_step"] == 0 and s["amp"] == "bfloat16"
    assert s["deploy_ok"] is True and s["deploy_max_rel_diff"] <= 1e-4
    assert s["deploy_prediction_agreement"] == 1.0
    assert s["params_deploy_form"] < s["params_train_form"]
    assert "lkconv train: summary" in capsys.readouterr().out

    # 2 steps, save; resume to 3: the same parameters as 3 steps in one go
    assert main(COMMON + ["--steps", "2", "--checkpoint", half]) == 0
    assert torch.load(half, weights_only=False)["step"] == 2
    assert main(COMMON + ["--steps", "3", "--resume", half, "--checkpoint", resumed,
                          "--summary-json", summ]) == 0
    assert json.load(open(summ))["start_step"] == 2
    a, b = _model_sd(full), _model_sd(resumed)
    assert list(a) == list(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6, msg=k)
    # training changed the weights
    torch.manual_seed(0)
    init = create_model("tiny", num_classes=3).state_dict()
    assert any(not torch.equal(init[k], a[k]) for k in a if k.endswith("weight"))


def test_train_main_bad_arguments(tmp_path, capsys):
    assert main(COMMON + ["--steps", "0"]) == 2
    assert "--steps must be >= 1" in capsys.readouterr().err
    assert main(COMMON + ["--steps", "1", "--resume", str(tmp_path / "missing.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--amp", "fp8"])


def test_ddp_two_processes_gloo_params_in_sync(tmp_path):
    dump = tmp_path / "params"
    summ = tmp_path / "s.json"
    ck = tmp_path / "ck.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__)))]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "lkconv.models.train"] + COMMON + [
        "--steps", "3", "--dump-params", str(dump), "--summary-json", str(summ), "--checkpoint", str(ck)]
    try:
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"DDP run timed out; output so far:\n{e.stdout}\n{e.stderr}")
    assert r.returncode == 0, f"torchrun failed ({r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    s = json.loads(summ.read_text())
    assert s["world_size"] == 2 and s["batch_size_global"] == 8
    assert s["params_max_rank_diff"] == 0.0
    assert s["deploy_ok"] is True
    r0 = torch.load(dump / "rank0.pt", weights_only=True)
    r1 = torch.load(dump / "rank1.pt", weights_only=True)
    assert list(r0) == list(r1)
    params = {n for n, _ in create_model("tiny", num_classes=3).named_parameters()}
    assert params and params <= set(r0)
    for k in r0:  # parameters: kept equal by DDP's gradient all-reduce; buffers: synced from rank 0 at the end
        assert torch.equal(r0[k], r1[k]), f"{k} differs between ranks"
    # the checkpoint (saved by rank 0) holds the same weights, and they moved away from the init
    ckm = _model_sd(ck)
    assert all(torch.equal(ckm[k], r0[k]) for k in r0)
    torch.manual_seed(0)
    init = create_model("tiny", num_classes=3).state_dict()
    assert any(not torch.equal(init[k], r0[k]) for k in r0 if k.endswith("weight"))


def test_deploy_check_detects_a_wrong_deployment(monkeypatch, capsys):
    import lkconv
    from lkconv.reparam import reparameterize

    def broken(model):  # re-parameterizes, then corrupts the merged biases
        reparameterize(model)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("lkb_reparam.bias"):
                    p.add_(1.0)
        return model

    monkeypatch.setattr(lkconv, "reparameterize", broken, raising=False)
    assert main(COMMON + ["--steps", "1"]) == 1
    assert "does not match" in capsys.readouterr().err
