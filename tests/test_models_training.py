"""Models (shapes, encoder/head split, dual encoder), training loop, records."""

from __future__ import annotations

import pytest
import torch

from flux_app.common.models import DualEncoderModel, SplitModel, build_model
from flux_app.common.params import weighted_average
from flux_app.common.records import ReplyError, check_state, from_record, to_record
from flux_app.common.training import evaluate, resolve_device, train


@pytest.mark.parametrize("name", ["lenet5", "cnn", "resnet9"])
@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32)])
def test_models_forward_and_split(name, shape):
    model = build_model(name, shape, 10, seed=0)
    assert isinstance(model, SplitModel)
    x = torch.rand(4, *shape)
    feats = model.features(x)
    assert feats.shape == (4, model.feature_dim)
    assert torch.allclose(model.head(feats), model(x))


def test_lenet5_is_the_flux_architecture():
    model = build_model("lenet5", (1, 28, 28), 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(6, (5, 5)), (16, (5, 5))]
    assert [(lin.in_features, lin.out_features) for lin in linears] == [
        (400, 120),
        (120, 84),
        (84, 10),
    ]
    assert any(isinstance(m, torch.nn.AvgPool2d) for m in model.modules())


def test_seeded_build_is_reproducible_and_private():
    torch.manual_seed(7)
    before = torch.rand(1)
    torch.manual_seed(7)
    a = build_model("lenet5", (1, 28, 28), 10, seed=3)
    after = torch.rand(1)
    b = build_model("lenet5", (1, 28, 28), 10, seed=3)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=False)
    )
    assert torch.equal(before, after)  # the caller's RNG stream is untouched


def test_dual_encoder_head_sees_both():
    model = build_model("lenet5", (1, 28, 28), 10, dual=True, seed=0)
    assert isinstance(model, DualEncoderModel)
    assert model.head.in_features == 2 * 84
    x = torch.rand(2, 1, 28, 28)
    assert model(x).shape == (2, 10)


def _blobs(n=200, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 2, (n,), generator=g)
    x = torch.rand(n, 1, 28, 28, generator=g) * 0.2
    x[y == 1, :, :14] += 0.8
    return x, y


def test_training_learns_and_is_deterministic():
    x, y = _blobs()
    accs, states = [], []
    for _ in range(2):
        model = build_model("lenet5", (1, 28, 28), 2, seed=1)
        train(model, x, y, epochs=3, lr=0.05, batch_size=32, seed=5)
        accs.append(evaluate(model, x, y).accuracy)
        states.append(model.state_dict())
    assert accs[0] > 0.95
    assert all(
        torch.equal(a, b) for a, b in zip(states[0].values(), states[1].values(), strict=False)
    )


def test_train_loss_is_the_float64_mean_of_the_step_losses():
    # the loss is summed on the device (no sync per step); it must equal a host-side float sum
    from flux_app.common.training import batches

    x, y = _blobs()
    got = train(build_model("lenet5", (1, 28, 28), 2, seed=1), x, y, epochs=2, lr=0.05, seed=5)
    model = build_model("lenet5", (1, 28, 28), 2, seed=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen, losses = torch.Generator().manual_seed(5), []
    for _ in range(2):
        for xb, yb in batches(x, y, 64, shuffle=True, generator=gen):
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(xb), yb)
            loss.backward()
            opt.step()
            losses.append(float(loss))
    assert got.steps == len(losses) and got.loss == sum(losses) / len(losses)


def test_frozen_parts_stay_bit_identical():
    x, y = _blobs()
    model = build_model("lenet5", (1, 28, 28), 2, dual=True, seed=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train(model, x, y, epochs=1, lr=0.05, trainable=[model.secondary])
    after = model.state_dict()
    for k in before:
        same = torch.equal(before[k], after[k])
        assert same != k.startswith("secondary."), k
    assert all(p.requires_grad for p in model.parameters())  # restored


def test_resolve_device():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in ("cpu", "cuda")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            resolve_device("cuda")


def test_record_roundtrip_and_checks():
    model = build_model("lenet5", (1, 28, 28), 10, seed=0)
    state = model.state_dict()
    back = from_record(to_record(state))
    assert all(torch.equal(state[k], back[k]) for k in state)
    bad = dict(back)
    bad["head.bias"] = torch.full_like(bad["head.bias"], float("nan"))
    with pytest.raises(ReplyError, match="non-finite"):
        check_state(state, bad)
    bad = dict(back)
    bad["head.bias"] = torch.zeros(3)
    with pytest.raises(ReplyError, match="shape"):
        check_state(state, bad)
    with pytest.raises(ReplyError, match="keys"):
        check_state(state, {k: v for k, v in back.items() if k != "head.bias"})


def test_weighted_average():
    a = {"w": torch.tensor([0.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 6.0]), "n": torch.tensor(5)}
    avg = weighted_average([a, b], [1, 3])
    assert torch.allclose(avg["w"], torch.tensor([3.0, 5.0]))
    assert int(avg["n"]) == 5
    with pytest.raises(ValueError):
        weighted_average([a], [0])
