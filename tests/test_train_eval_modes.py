"""train()/eval() after compiling: a compiled model follows the mode like eager, or refuses.

Regression tests of fixes:

* fx bakes a forward's `self.training` branch into the graph: compiled in train mode, a
  block computing `x * 2 if self.training else x` kept doubling after `cm.eval()` (max
  difference to eager 0.67 on the model below). Capture now traces once more with every mode
  flipped; a different graph makes the traced-through modules' modes checked per call.
* `fuse=True` folded nn.Dropout's mode into the fused dropout+add: after `cm.eval()` the
  output still dropped (max difference 10.5 on 4 residual blocks). The fused modules' modes
  are now checked per call as well.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxpipe
from fxpipe.errors import RuntimeMismatchError

__all__: list[str] = []

RTOL, ATOL = 1e-4, 1e-6


class _Doubling(nn.Module):
    """Reads `self.training` itself: the branch is Python, so fx keeps only the one taken."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.lin(x))
        return x * 2 if self.training else x


class _FunctionalDropout(nn.Module):
    """Passes its mode on to F.dropout, which fx records with the flag as a constant."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.dropout(torch.tanh(self.lin(x)), 0.5, self.training)


def _data(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 8, generator=g), torch.randn(n, 8, generator=g)


def _compile(model: nn.Module, **kw) -> fxpipe.CompiledModel:
    x, _ = _data()
    cm = fxpipe.compile(model, ["cpu"] * 2, (x,), microbatches=2, capture_method="fx", **kw)
    assert cm.plan.capture_path == "fx"
    return cm


def test_forward_reading_training_is_refused_in_the_other_mode_fx() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[_Doubling() for _ in range(4)]).train()
    ref = copy.deepcopy(model)
    x, t = _data()
    cm = _compile(model)
    assert cm._cap.mode_dependent
    cm.eval()
    with pytest.raises(RuntimeMismatchError, match=r"eval mode but was in train mode.*self\.training.*model\.train\(\)"):
        cm(x)
    with pytest.raises(RuntimeMismatchError, match="self.training"):
        cm.step(x, target=t, loss_fn=F.mse_loss)
    cm.train()  # the compiled mode: equal to eager again
    torch.testing.assert_close(cm(x), ref(x), rtol=RTOL, atol=ATOL)

    # compiled in eval mode: a training step in train mode is refused the same way
    model = copy.deepcopy(ref).eval()
    cm = _compile(model)
    torch.testing.assert_close(cm(x), ref.eval()(x), rtol=RTOL, atol=ATOL)
    cm.train()
    with pytest.raises(RuntimeMismatchError, match="train mode but was in eval mode"):
        cm.step(x, target=t, loss_fn=F.mse_loss)


def test_training_flag_passed_to_functional_dropout_is_noticed_fx() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), _FunctionalDropout(), nn.Linear(8, 8), _FunctionalDropout()).eval()
    ref = copy.deepcopy(model)
    x, _ = _data()
    cm = _compile(model)
    assert cm._cap.mode_dependent
    torch.testing.assert_close(cm(x), ref(x), rtol=RTOL, atol=ATOL)
    model.train()  # the user's model, not cm: the same check
    with pytest.raises(RuntimeMismatchError, match="train mode but was in eval mode"):
        cm(x)


@pytest.mark.filterwarnings("ignore::fxpipe.errors.MicrobatchStatisticsWarning")
def test_leaf_modules_follow_the_mode_without_refusal_fx() -> None:
    # nn.Dropout / nn.BatchNorm1d are call_module nodes: they read their mode when called
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 8),
                          nn.Dropout(0.5), nn.Linear(8, 8)).train()
    ref = copy.deepcopy(model)
    x, _ = _data()
    cm = _compile(model)
    assert not cm._cap.mode_dependent and cm._cap.modes == {}
    cm.eval()
    ref.eval()
    torch.testing.assert_close(cm(x), ref(x), rtol=RTOL, atol=ATOL)


def test_only_traced_through_modules_are_checked_fx() -> None:
    # a mode-dependent model whose leaf dropout alone is switched off: allowed, and equal
    torch.manual_seed(0)
    model = nn.Sequential(_Doubling(), nn.Dropout(0.5), _Doubling(), _Doubling()).train()
    x, _ = _data()
    cm = _compile(model)
    assert cm._cap.mode_dependent and "1" not in cm._cap.modes and "0" in cm._cap.modes
    model[1].eval()
    torch.testing.assert_close(cm(x), model(x), rtol=RTOL, atol=ATOL)


class _ResidualDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.lin(x))


def test_fused_dropout_takes_its_mode_and_other_modes_are_refused() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(*[_ResidualDropout() for _ in range(4)]).eval()
    ref = copy.deepcopy(model)
    x, _ = _data()
    cm = _compile(model, fuse=True)
    assert "dropout_add" in cm._cap.gm.code and not cm._cap.mode_dependent
    torch.testing.assert_close(cm(x), ref(x), rtol=RTOL, atol=ATOL)
    cm.train()
    with pytest.raises(RuntimeMismatchError, match=r"module '0\.drop' is in train mode.*fuse=True"):
        cm(x)


# ---- BatchNorm and buffers updated in forward, with several microbatches ---------------------
def _bn_net(cumulative: bool = True) -> nn.Sequential:
    # a BatchNorm in each half, so that with 2 stages each is owned by another worker;
    # momentum=None (a cumulative mean) divides by num_batches_tracked, so the count matters too
    # (torch.export cannot trace that division: float() of a tensor)
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(),
                         nn.Linear(16, 16), nn.BatchNorm1d(16, momentum=None if cumulative else 0.3), nn.ReLU(),
                         nn.Linear(16, 3)).train()


def _bn_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    return torch.randn(16, 6, generator=g) * 3 + 1, torch.randn(16, 3, generator=g)


def _stats(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}


M = 4


@pytest.mark.parametrize("schedule, recompute, method", [
    ("1f1b", False, "fx"), ("gpipe", False, "fx"), ("1f1b", True, "fx"), ("1f1b", True, "export")])
def test_batchnorm_step_equals_eager_on_the_microbatches_in_order(schedule: str, recompute: bool, method: str) -> None:
    """The reference: eager on each microbatch in order, loss scaled by its share. Before the
    fix, a recomputing stage updated its running statistics again in the recomputation
    (num_batches_tracked 8 instead of 4, running_var off by up to 0.19)."""
    model = _bn_net(cumulative=method == "fx")
    ref, whole = copy.deepcopy(model), copy.deepcopy(model)
    x, t = _bn_data()
    with pytest.warns(fxpipe.errors.MicrobatchStatisticsWarning, match=r"'1', '6'.*4 microbatches"):
        cm = fxpipe.compile(model, ["cpu"] * 2, (x,), microbatches=M, schedule=schedule, recompute=recompute,
                            capture_method=method)
    assert [s.recompute for s in cm.plan.stages] == [recompute] * 2
    owners = [[m for m in sg.modules + sg.attrs if m.startswith(("1", "6"))] for sg in cm.stage_graphs]
    assert all(owners), owners  # each stage owns one of the BatchNorms
    for _ in range(2):  # the second step starts from the statistics the first one left
        loss = cm.step(x, target=t, loss_fn=F.mse_loss)
        ref_loss = sum(F.mse_loss(ref(xc), tc) / M for xc, tc in zip(x.tensor_split(M), t.tensor_split(M)))
        ref_loss.backward()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=RTOL, atol=1e-5)
    got, want = _stats(cm), _stats(ref)  # cm.state_dict() holds the updated buffers
    assert int(got["1.num_batches_tracked"]) == int(got["6.num_batches_tracked"]) == 2 * M
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")
    for (k, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=RTOL, atol=1e-5, msg=lambda m: f"{k}: {m}")
    # and not eager on the whole batch: that is what the warning says
    F.mse_loss(whole(x), t).backward()
    assert not torch.allclose(got["1.running_var"], _stats(whole)["1.running_var"], rtol=1e-3)


def test_call_in_train_mode_updates_statistics_per_microbatch_like_eager() -> None:
    model = _bn_net()
    ref = copy.deepcopy(model)
    x, _ = _bn_data()
    with pytest.warns(fxpipe.errors.MicrobatchStatisticsWarning):
        cm = fxpipe.compile(model, ["cpu"] * 2, (x,), microbatches=M)
    with torch.no_grad():
        y = cm(x)
        want = torch.cat([ref(xc) for xc in x.tensor_split(M)])
    torch.testing.assert_close(y, want, rtol=RTOL, atol=ATOL)
    for k, v in _stats(ref).items():
        torch.testing.assert_close(cm.state_dict()[k], v, rtol=RTOL, atol=ATOL, msg=lambda m: f"{k}: {m}")
    cm.eval()  # running statistics now: the whole batch's result whatever the split, no update
    before = {k: v.clone() for k, v in _stats(cm).items()}
    torch.testing.assert_close(cm(x), ref.eval()(x), rtol=RTOL, atol=ATOL)
    assert all(torch.equal(v, before[k]) for k, v in _stats(cm).items())


def test_no_warning_with_one_microbatch_or_in_eval_mode() -> None:
    import warnings

    x, _ = _bn_data()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fxpipe.compile(_bn_net(), ["cpu"] * 2, (x,), microbatches=1)
        fxpipe.compile(_bn_net().eval(), ["cpu"] * 2, (x,), microbatches=M)
    assert not [w for w in caught if issubclass(w.category, fxpipe.errors.MicrobatchStatisticsWarning)]


class _SharedNorm(nn.Module):
    """One BatchNorm used at both ends: with 2 stages, the second stage runs a copy of it."""

    def __init__(self) -> None:
        super().__init__()
        self.ls = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
        self.bn = nn.BatchNorm1d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.ls[0](x))
        for lin in self.ls[1:]:
            x = torch.tanh(lin(x))
        return self.bn(x)


def test_module_shared_by_two_stages_follows_eval_and_refuses_lost_statistics() -> None:
    """Before: the second stage's copy of the shared BatchNorm stayed in train mode after
    cm.eval() (max difference to eager 2.17), and in train mode its statistic updates were lost
    (num_batches_tracked 1 where eager counts 2 per call)."""
    torch.manual_seed(0)
    model = _SharedNorm()
    ref = copy.deepcopy(model)
    x, _ = _data()
    cm = fxpipe.compile(model, ["cpu"] * 2, (x,), microbatches=1, capture_method="fx")
    assert all("bn" in sg.modules for sg in cm.stage_graphs)
    with pytest.raises(RuntimeMismatchError, match=r"module 'bn' \(BatchNorm1d\) is used by more than one stage"):
        cm(x)
    cm.eval()
    ref.eval()
    torch.testing.assert_close(cm(x), ref(x), rtol=RTOL, atol=ATOL)
    cm.train()
    ref.train()
    model.bn.eval()  # frozen statistics, the rest in train mode: allowed, and equal
    ref.bn.eval()
    torch.testing.assert_close(cm(x), ref(x), rtol=RTOL, atol=ATOL)


class _NormAtBothEnds(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn, self.c = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 4)
        self.b = nn.Sequential(*[nn.Linear(8, 8) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(self.bn(self.b(self.bn(self.a(x)))))


@pytest.mark.filterwarnings("ignore::fxpipe.errors.MicrobatchStatisticsWarning")
def test_buffer_an_export_graph_updates_on_two_stages_is_refused() -> None:
    """torch.export writes a training-mode BatchNorm's statistics in the graph (batch_norm on
    get_attr buffers, num_batches_tracked.add_), not through a module, so the shared-module
    check did not see it: both backends ran and lost the second stage's updates (state dict
    2.0 off eager's: num_batches_tracked). Refused per call now; in eval mode it runs."""
    torch.manual_seed(0)
    model = _NormAtBothEnds().train()
    ref = copy.deepcopy(model)
    x, t = torch.randn(16, 8), torch.randn(16, 4)
    cm = fxpipe.compile(model, ["cpu"] * 2, (x,), microbatches=2, capture_method="export")
    assert cm.plan.capture_path == "export" and not any(sg.modules for sg in cm.stage_graphs)
    assert all("bn.running_mean" in sg.attrs for sg in cm.stage_graphs)
    with pytest.raises(RuntimeMismatchError, match=r"buffer 'bn\.(num_batches_tracked|running_mean)' is updated in "
                                                   r"place.*used by stages \[0, 1\]"):
        cm.step(x, target=t, loss_fn=F.mse_loss)
    with pytest.raises(RuntimeMismatchError, match="updated in place"):
        cm(x)
    ref.eval()
    cm = fxpipe.compile(copy.deepcopy(ref), ["cpu"] * 2, (x,), microbatches=2, capture_method="export")
    assert all("bn.running_mean" in sg.attrs for sg in cm.stage_graphs)
    torch.testing.assert_close(cm(x), ref(x), rtol=RTOL, atol=ATOL)  # no update in eval: runs
