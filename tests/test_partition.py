"""A model compiled in parts (qcompiler/partition.py): a tensor one part hands to another is
quantized once, and the partitioned model saves, loads and draws as one.

The model's root loops over a list of images, which torch.fx cannot trace, so qcompile splits
it into `body`, `head` and `side`. `body`'s two outputs, of different ranges, both go straight
into `head`, so all three ports are one tensor boundary with one quantizer; `side` reads a value
the host computed, so its input is not a boundary.
"""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

import qcompiler
from qcompiler.allocation import AllocationProblem, CostTable, combine_problems, solve_allocation
from qcompiler.errors import ArtifactError, BudgetError, QCompileError
from qcompiler.formats import qparams_from_range
from qcompiler.partition import PartitionedModel, same_quantizer


class Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv3 = nn.Conv2d(8, 8, 3, stride=2, padding=1)

    def forward(self, x):
        f = self.conv2(torch.relu(self.conv(x)))
        return f, 3 * self.conv3(f)


class Head(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv(x)


class Loopy(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head, self.side = Body(), Head(), Head()

    def forward(self, images):
        out = []
        for x in images:                       # iteration over an input list: the root cannot be traced
            fine, coarse = self.body(x)
            out.append(self.head(fine).mean() + self.head(coarse).mean() + self.side(fine * 0.5))
        return out


def batches(n, seed):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(2, 3, 12, 12, generator=g) for _ in range(2)] for _ in range(n)]


@pytest.fixture(scope="module")
def compiled():
    torch.manual_seed(0)
    model = Loopy().eval()
    calib = batches(4, 1)
    c = qcompiler.qcompile(model, calib[0], target="npu-int8", calib_data=calib, observer="minmax", progress=False)
    return model, calib, c


def test_a_tensor_passed_between_parts_has_one_quantizer(compiled):
    model, calib, c = compiled
    assert isinstance(c, PartitionedModel) and c.partition.parts == ["body", "head", "side"]
    assert [b.ports for b in c.boundaries] == [[("body", "output:0"), ("body", "output:1"), ("head", "input:0")]]
    out_q, in_q = c.port_quantizer("body", "output:0"), c.port_quantizer("head", "input:0")
    assert same_quantizer(out_q, in_q) and same_quantizer(c.port_quantizer("body", "output:1"), in_q)
    # side reads f * 0.5, a host value: its input quantizer is its own.
    assert not same_quantizer(out_q, c.port_quantizer("side", "input:0"))
    # The one quantizer's range is what a min-max observer gives over every value body produced
    # (both outputs, both images of every calibration batch), computed here independently.
    with torch.no_grad():
        values = torch.cat([t.flatten() for batch in calib for x in batch for t in model.body(x)])
    fmt = c.parts["head"].plan.group(c.parts["head"].simulated.graph.find_nodes(op="placeholder")[0]
                                     .meta["group"]).format
    expected = qparams_from_range(fmt, values.min(), values.max())
    torch.testing.assert_close(in_q[1].scale, expected.scale, rtol=0, atol=0)
    torch.testing.assert_close(in_q[1].zero_point, expected.zero_point, rtol=0, atol=0)
    # Quantized once: head's input quantizer maps body's compiled output onto itself.
    x = batches(1, 7)[0][0]
    with torch.no_grad():
        produced = c.parts["body"](x)[1]
        head_gm = c.parts["head"].simulated
        stub = next(n for n in head_gm.graph.nodes if n.op == "call_module" and n.args
                    and n.args[0].op == "placeholder")
        torch.testing.assert_close(head_gm.get_submodule(stub.target)(produced), produced, rtol=0, atol=0)
    assert "body[output:0] -> body[output:1] -> head[input:0]: one quantizer" in c.report()


def test_a_partitioned_model_saves_loads_and_draws_as_one(compiled, tmp_path):
    model, _, c = compiled
    c.save(tmp_path / "saved")
    with pytest.raises(ArtifactError, match=r"qcompiler.load\(path, model=float_model\)"):
        qcompiler.load(tmp_path / "saved")
    loaded = qcompiler.load(tmp_path / "saved", model=model)
    assert isinstance(loaded, PartitionedModel) and loaded.partition.parts == c.partition.parts
    assert [b.ports for b in loaded.boundaries] == [b.ports for b in c.boundaries]
    images = batches(1, 9)[0]
    with torch.no_grad():
        for a, b in zip(c(images), loaded(images)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert "one quantizer" in loaded.report()
    # A save into a directory that holds something else is refused, nothing overwritten.
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ArtifactError, match="not an empty directory"):
        c.save(tmp_path / "other")
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"

    class Other(nn.Module):
        def forward(self, images):
            return images

    with pytest.raises(ArtifactError, match="does not have"):
        qcompiler.load(tmp_path / "saved", model=Other())
    # One drawing per part, named after it.
    written = c.render(tmp_path / "parts.dot")
    assert [p.rsplit("/", 1)[1] for p in written] == ["parts.body.dot", "parts.head.dot", "parts.side.dot"]
    assert all("digraph" in open(p).read() for p in written)


def test_one_budget_spans_every_part(compiled):
    """npu-int4 with a weight-memory budget: one program over the groups of all parts. The
    spec's 8-bit first and last layers are the model's ends only: body's last conv feeds head,
    so it may take 4 bits; head's conv writes the model's output, so it may not."""
    model, calib, _ = compiled
    full = qcompiler.qcompile(model, calib[0], target="npu-int4", calib_data=calib, budget={"weight_memory": 1.0},
                              progress=False)
    c = qcompiler.qcompile(model, calib[0], target="npu-int4", calib_data=calib, budget={"weight_memory": 0.83},
                           progress=False)
    weights = {p: {g.owner: g for g in part.plan.groups if g.kind == "weight"} for p, part in c.parts.items()}
    assert weights["body"]["conv3"].candidates == ("w8", "w4") and weights["head"]["conv"].candidates == ("w8",)
    assert weights["body"]["conv"].candidates == ("w8",)           # reads the model's input
    result = c.parts["body"]._run.ctx.allocation_result
    problem = c.parts["body"]._run.ctx.allocation_problem
    assert all(part._run.ctx.allocation_result is result for part in c.parts.values())
    # The plan meets the budget as the parts' own costs add up, and is the program's optimum,
    # checked by enumerating every plan of the joint program.
    assert c.weight_memory_bytes == result.costs["weight_memory"] <= 0.83 * full.weight_memory_bytes
    assert c.weight_memory_bytes < full.weight_memory_bytes
    plans = [dict(zip(problem.candidates, combo)) for combo in itertools.product(*problem.candidates.values())]
    feasible = [p for p in plans if problem.feasible_ties(p) and problem.cost("weight_memory", p) <= result.budgets["weight_memory"]]
    assert len(feasible) < len(plans)                               # the budget binds
    assert result.objective == pytest.approx(min(problem.objective(p) for p in feasible))
    assert "one program over all 3 parts" in "\n".join(c.parts["head"]._run.ctx.notes["allocate_bits"])
    with pytest.raises(BudgetError, match="smallest feasible value"):
        qcompiler.qcompile(model, calib[0], target="npu-int4", calib_data=calib, budget={"weight_memory": 0.1},
                           progress=False)
    # What parts do not support yet is refused, not silently dropped.
    with pytest.raises(QCompileError, match="compiled in parts .* target_quality"):
        qcompiler.qcompile(model, calib[0], target="npu-int4", calib_data=calib, target_quality={"sqnr_db": 20},
                           progress=False)


def test_combined_problems_tie_a_boundary_to_one_bit_width():
    """Two graphs' problems in one program: costs add, ids are offset, and a tensor quantized in
    both (group 0 of each) takes one bit width."""
    def one(sens4):
        table = CostTable(10.0, {(0,): {("a8",): 8.0, ("a4",): 4.0}})
        return AllocationProblem(candidates={0: ("a8", "a4")}, bits={0: {"a8": 8, "a4": 4}},
                                 sensitivity={0: {"a8": 0.0, "a4": sens4}}, costs={"m": table}, defaults={0: "a8"})

    problem, owners = combine_problems([one(1.0), one(100.0)], equal=[[(0, 0), (1, 0)]])
    assert owners == [{0: 0}, {1: 0}] and problem.costs["m"].constant == 20.0
    free = solve_allocation(combine_problems([one(1.0), one(100.0)])[0], {"m": 32.0})
    assert free.choice == {0: "a4", 1: "a8"}                         # untied: the cheap one drops
    tied = solve_allocation(problem, {"m": 32.0})                   # tied: both 4 bits or neither
    assert tied.choice == {0: "a4", 1: "a4"} and tied.objective == 101.0
    with pytest.raises(BudgetError):
        solve_allocation(problem, {"m": 27.0})
