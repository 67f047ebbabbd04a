"""utils/checkpoint.py: restoring a training state across changed AMP settings and world sizes."""
import torch

from utils.checkpoint import restore_training_state, rng_state


def _state(scaler_state):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler_state,
            "iter": 7, "rng": [rng_state()], "args": {}}


def test_fp16_resume_of_an_fp32_run_starts_a_fresh_scaler():
    """A run trained in fp32 or bf16 has an empty scaler state; resuming it with --amp fp16 used
    to crash in GradScaler.load_state_dict({}). The enabled scaler now starts fresh."""
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    fresh = torch.amp.GradScaler("cpu", enabled=True).state_dict()
    assert restore_training_state(_state({}), model=model, optimizer=opt, scaler=scaler, seed=0) == 7
    assert scaler.state_dict()["scale"] == fresh["scale"]
    # ... and an fp16 run resumed in fp32 ignores the saved scale
    saved = torch.amp.GradScaler("cpu", enabled=True, init_scale=8.0).state_dict()
    off = torch.amp.GradScaler("cpu", enabled=False)
    assert restore_training_state(_state(saved), model=model, optimizer=opt, scaler=off, seed=0) == 7
    assert not off.is_enabled()
