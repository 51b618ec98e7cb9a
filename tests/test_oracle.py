import numpy as np
import pytest
import torch

from toolkit.artifacts import Deployable, ModelDeployable
from toolkit.errors import UserError
from toolkit.models import build_model
from toolkit.oracle import BudgetExhausted, Oracle, recover_logits


@pytest.fixture(scope="module")
def victim():
    torch.manual_seed(0)
    model = build_model("lenet5_fifth", (1, 32, 32), 10, [0.13], [0.31])
    return ModelDeployable(model, {"dataset": {"input_shape": [1, 32, 32], "num_classes": 10}})


def test_soft_answers_are_detached_probabilities(victim):
    oracle = Oracle(victim, budget=100)
    x = torch.rand(7, 1, 32, 32, requires_grad=True)
    p = oracle.query(x)
    assert p.shape == (7, 10) and p.grad_fn is None and not p.requires_grad
    torch.testing.assert_close(p, victim.predict_proba(x.detach()))
    torch.testing.assert_close(p.sum(1), torch.ones(7))
    with pytest.raises(RuntimeError):
        p.sum().backward()  # no path back to the input, let alone the weights
    assert oracle.queries_used == 7


def test_hard_answers_leak_no_probabilities(victim):
    oracle = Oracle(victim, budget=100, output="hard")
    x = torch.rand(9, 1, 32, 32)
    labels = oracle.query(x)
    assert labels.dtype == torch.int64 and labels.shape == (9,)
    assert torch.equal(labels, victim.predict_proba(x).argmax(1))


def test_budget_is_never_exceeded_by_one_query(victim):
    oracle = Oracle(victim, budget=10)
    oracle.query(torch.rand(6, 1, 32, 32))
    with pytest.raises(BudgetExhausted):
        oracle.query(torch.rand(5, 1, 32, 32))
    assert oracle.queries_used == 6  # a refused request is neither answered nor counted
    oracle.query(torch.rand(4, 1, 32, 32))
    with pytest.raises(BudgetExhausted):
        oracle.query(torch.rand(1, 1, 32, 32))
    assert oracle.queries_used == 10 == oracle.budget and oracle.remaining == 0


def test_oracle_exposes_no_model(victim):
    oracle = Oracle(victim, budget=5)
    reachable = list(vars(oracle).values())
    assert not any(isinstance(v, (Deployable, torch.nn.Module)) for v in reachable)
    assert not hasattr(oracle, "victim") and not hasattr(oracle, "model")


@pytest.mark.parametrize("bad,message", [
    (torch.rand(2, 3, 32, 32), r"shape \(N, 1, 32, 32\)"),
    (torch.rand(1, 32, 32), r"shape \(N, 1, 32, 32\)"),
    (torch.full((2, 1, 32, 32), float("nan")), "NaN"),
    (torch.rand(2, 1, 32, 32) * 3, r"\[0, 1\]"),
    (torch.zeros(0, 1, 32, 32), "empty"),
    ("pixels", "array of images"),
    (torch.ones(2, 1, 32, 32, dtype=torch.int32), "float pixels"),
])
def test_malformed_queries_are_rejected_and_not_counted(victim, bad, message):
    oracle = Oracle(victim, budget=50)
    with pytest.raises(UserError, match=message):
        oracle.query(bad)
    assert oracle.queries_used == 0


def test_uint8_and_numpy_queries(victim):
    oracle = Oracle(victim, budget=50)
    x = np.random.default_rng(0).integers(0, 256, (3, 1, 32, 32), dtype=np.uint8)
    torch.testing.assert_close(oracle.query(x), victim.predict_proba(torch.as_tensor(x).float() / 255))


def test_top_k_and_rounding(victim):
    x = torch.rand(5, 1, 32, 32)
    top = Oracle(victim, 10, top_k=2).query(x)
    assert ((top > 0).sum(1) == 2).all()
    torch.testing.assert_close(top.sum(1), torch.ones(5))
    rounded = Oracle(victim, 10, round=2).query(x)
    np.testing.assert_allclose(rounded.numpy() * 100, np.round(rounded.numpy() * 100), atol=1e-4)


def test_logit_recovery_is_centred_log_probability():
    logits = torch.randn(4, 10) * 3
    p = torch.softmax(logits, 1)
    z = recover_logits(p)
    torch.testing.assert_close(z, logits - logits.mean(1, keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.softmax(z, 1), p)
