"""The cheap ways to a ticket of issue #23: short-level IMP (two short-search pruning steps to
each target), early-bird tickets trained on from where they were drawn, RigL at IMP's per-layer
counts with grow gradients from more tasks and a longer run — each checked on what it writes."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
import yaml

from sparsemeta.config import build_config
from sparsemeta.experiments.methods.base import ImpPlan
from sparsemeta.experiments.methods.eb_continue import DrawHooks, EbContinueSettings
from sparsemeta.experiments.methods.rigl import GROW_TASKS_FROM, RigLHooks
from sparsemeta.experiments.methods.short_imp import halfway
from sparsemeta.experiments.report import write_report
from sparsemeta.experiments.runner import check_experiment, run_experiment
from sparsemeta.foundations.errors import UserError
from sparsemeta.sparsity.masks import full_mask, load_mask
from sparsemeta.sparsity.prune import top_magnitude_mask
from sparsemeta.training.hooks import StepContext
from sparsemeta.training.rundir import RunDir, level_dir
from sparsemeta.training.setup import prepare
from tests.conftest import make_data

ITERATIONS, META_BATCH, SHORT = 10, 2, 4
OVERRIDES = ["device=cpu", "data.image_size=16", "model.filters=8",
             f"train.iterations={ITERATIONS}", f"train.meta_batch={META_BATCH}",
             "train.val_every=5", "train.val_tasks=4", "train.checkpoint_every=5",
             "eval.tasks=6", "data.queries=2", "prune.levels=3", "prune.rate=0.5",
             "prune.targets=[0.5, 0.13]", f"short_imp.iterations={SHORT}",
             "eb_continue.every=1", "eb_continue.window=2", "eb_continue.epsilon=0.5",
             "eb_continue.lr_factor=2.0", "eb_continue.max_search=1.0", "rigl.distribution=imp", "rigl.grow_tasks=3",
             "rigl.iterations_factor=1.5", "rigl.update_every=2"]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    root = tmp_path_factory.mktemp("cheap2")
    run_experiment(build_config(overrides=OVERRIDES), root,
                   ["lottery", "short_imp", "eb_continue", "rigl"], [0], [], progress=False,
                   data=make_data())
    return root


def _counts(mask) -> dict[str, int]:  # noqa: ANN001
    return {k: int(m.sum()) for k, m in mask.items()}


def test_short_imp_prunes_in_two_short_steps_to_imps_counts_and_rewinds(experiment):
    dense = RunDir(level_dir(experiment, 0, 0, "short_imp_search"))
    assert dense.result().iterations_run == SHORT and not dense.result().model
    theta0 = RunDir(level_dir(experiment, 0, 0)).weights("init.pt")
    for level in (1, 3):
        ticket_mask = _counts(load_mask(level_dir(experiment, 0, level) / "mask.pt"))
        search = level_dir(experiment, 0, level, "short_imp_search")
        first = load_mask(search / "mask.pt")
        total = {k: m.numel() for k, m in first.items()}
        assert _counts(first) == halfway(total, ticket_mask)
        assert all(c == max(ticket_mask[k], round(math.sqrt(total[k] * ticket_mask[k])))
                   for k, c in _counts(first).items())
        assert RunDir(search).result().iterations_run == SHORT
        path = level_dir(experiment, 0, level, "short_imp")
        mask = load_mask(path / "mask.pt")
        assert _counts(mask) == ticket_mask  # the ticket's architecture budget, exactly
        expected = top_magnitude_mask(RunDir(search).trained_weights(), ticket_mask, within=first)
        assert all(torch.equal(mask[k], expected[k]) for k in mask)
        assert all(not (mask[k] & ~first[k]).any() for k in mask)  # pruned within step one
        init = RunDir(path).weights("init.pt")
        assert all(torch.equal(init[k], theta0[k]) for k in theta0)  # rewound to θ₀
        assert RunDir(path).result().iterations_run == ITERATIONS


def test_short_imp_is_charged_its_two_search_runs(experiment):
    runs = {(r["method"], r["level"]): r for r in write_report([experiment])["runs"]}
    ticket = runs[("short_imp", 3)]
    search = [RunDir(level_dir(experiment, 0, lv, "short_imp_search")).result().macs["train"]
              for lv in (0, 3)]
    assert ticket["compute_macs"] == ticket["train_macs"] + sum(search)


def test_a_late_rewind_past_the_short_search_is_refused_before_any_run():
    cfg = build_config(overrides=[*OVERRIDES, "prune.rewind=step:5"])
    with pytest.raises(UserError, match=r"prune.rewind=step:5 is past short_imp.iterations=4"):
        check_experiment(prepare(cfg, make_data()), ["short_imp"], [0], [], 1)


def test_early_bird_searches_faster_and_each_ticket_trains_on_from_its_draw(experiment):
    search = RunDir(level_dir(experiment, 0, 0, "eb_continue_search"))
    saved = yaml.safe_load(search.file("config.yaml").read_text())
    assert saved["train"]["meta_lr"] == pytest.approx(2.0 * build_config(
        overrides=OVERRIDES).train.meta_lr)  # the search's own, recorded where it ran
    state = search.checkpoint().hooks
    assert set(state["drawn"]) == {1, 3}
    assert search.result().iterations_run == max(state["drawn_at"].values()) < ITERATIONS
    for level in (1, 3):
        path = level_dir(experiment, 0, level, "eb_continue")
        mask = load_mask(path / "mask.pt")
        assert all(torch.equal(mask[k], state["drawn"][level][k]) for k in mask)
        ticket = _counts(load_mask(level_dir(experiment, 0, level) / "mask.pt"))
        assert _counts(mask) == ticket
        init, drawn = RunDir(path).weights("init.pt"), state["weights"][level]
        assert all(torch.equal(init[k], drawn[k]) for k in drawn)  # not θ₀: the drawn weights
        left = ITERATIONS - state["drawn_at"][level]
        assert RunDir(path).result().iterations_run == left


def test_the_draw_waits_until_the_newest_mask_is_near_every_mask_of_the_window():
    """You et al.'s criterion: the newest mask against each of the last ``window`` (not only the
    previous one): a mask that returns to an old state after one step away is not drawn."""
    eb = EbContinueSettings(epsilon=0.3, every=1, window=2)
    w = {"a.weight": torch.zeros(10)}
    hooks = DrawHooks({1: {"a.weight": 5}}, eb)
    steps = [[1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # masks kept: the first five…
             [0, 0, 0, 0, 0, 1, 1, 1, 1, 1],  # …then the other five (distance 1.0)
             [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # back: near step 1, far from step 2
             [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # equal to step 3, still far from step 2
             [1, 1, 1, 1, 1, 0, 0, 0, 0, 0]]  # near both of the last two: drawn
    fired = []
    learner = type("L", (), {"state_dict": lambda self: dict(w)})()
    for step, big in enumerate(steps, start=1):
        w["a.weight"] = torch.tensor(big, dtype=torch.float32) + 0.01 * torch.arange(10)
        fired.append(hooks.should_stop(StepContext(step, w, None, None, learner, [])))
    assert fired == [False, False, False, False, True] and hooks.drawn_at == {1: 5}
    assert torch.equal(hooks.weights[1]["a.weight"], w["a.weight"])  # the state drawn with it
    assert isinstance(hooks.queues[1], deque) and len(hooks.queues[1]) == 2


def test_rigl_at_imps_counts_grows_from_more_tasks_and_runs_longer(experiment):
    plan = ImpPlan.of(build_config(overrides=OVERRIDES), 1)
    for level in (1, 3):
        path = level_dir(experiment, 0, level, "rigl")
        assert _counts(load_mask(path / "mask.pt")) == plan.counts[level]  # distribution=imp
        assert RunDir(path).result().iterations_run == round(1.5 * ITERATIONS)


def test_rigl_grow_gradients_take_more_tasks_at_indices_training_never_reaches():
    params = {"a.weight": torch.randn(4, 4, requires_grad=True)}
    drawn = []

    def draw(i: int) -> str:
        drawn.append(i)
        return f"task {i}"

    hooks = RigLHooks(0.3, every=1, end=100, grow_tasks=3)
    ctx = StepContext(7, params, full_mask(params), None, None, ["t0", "t1"], draw_task=draw)
    assert hooks._grow_tasks(ctx) == ["t0", "t1", *(f"task {i}" for i in drawn)]
    assert drawn == [GROW_TASKS_FROM + 7 * 3 + i for i in range(3)]
    assert RigLHooks(0.3, 1, 100)._grow_tasks(ctx) == ["t0", "t1"]


def test_an_early_bird_search_that_never_settles_stops_at_its_longest_and_draws_there(tmp_path):
    """ε so small that no mask settles: the search ends after max_search of the budget, draws
    every target from its last weights, and each ticket trains the rest of the budget."""
    cfg = build_config(overrides=[*OVERRIDES, "eb_continue.epsilon=1e-9",
                                  "eb_continue.max_search=0.3"])
    run_experiment(cfg, tmp_path, ["eb_continue"], [0], [], progress=False, data=make_data())
    search = RunDir(level_dir(tmp_path, 0, 0, "eb_continue_search"))
    assert search.result().iterations_run == 3 and search.checkpoint().hooks["drawn"] == {}
    last = search.trained_weights()
    for level in (1, 3):
        path = level_dir(tmp_path, 0, level, "eb_continue")
        init = RunDir(path).weights("init.pt")
        mask = load_mask(path / "mask.pt")
        assert all(torch.equal(init[k], last[k]) for k in last)
        assert RunDir(path).result().iterations_run == ITERATIONS - 3
        assert all(torch.equal(mask[k], m) for k, m in
                   top_magnitude_mask(last, _counts(mask)).items())


def test_the_report_charges_wall_and_cpu_time_as_it_charges_flops(experiment):
    report = write_report([experiment])
    runs = {(r["method"], r["level"]): r for r in report["runs"]}
    rows = {(r["method"], r["level"]): r for r in report["rows"]}
    cpu = {lv: RunDir(level_dir(experiment, 0, lv, "short_imp_search")).result().cpu_seconds
           for lv in (0, 3)}
    own = runs[("short_imp", 3)]
    imp = sum(runs[("ticket", lv)]["cpu_seconds"] for lv in range(4))
    assert own["compute_cpu"] == pytest.approx(own["cpu_seconds"] + cpu[0] + cpu[3])
    assert rows[("short_imp", 3)]["cpu_vs_imp"] == pytest.approx(own["compute_cpu"] / imp)
    assert rows[("rigl", 3)]["wall_vs_imp"] > 0 and rows[("ticket", 3)]["cpu_vs_imp"] == 1.0
    md = (experiment / "report.md").read_text()
    assert "CPU ×IMP" in md and (experiment / "pareto_cpu.png").exists()


def _record(method: str, seed: int, level: int, accuracy: float, cost: float = 1.0) -> dict:
    """A report record as ``collect`` makes it, with what ``summarize`` reads."""
    return {"method": method, "seed": seed, "level": level, "accuracy": accuracy,
            "density": 1.0 if level == 0 else 0.2, "task_ci95": 0.01, "per_step": [accuracy],
            "val_accuracy": accuracy, "early_stop_iteration": 10, "train_seconds": 1.0,
            "cpu_seconds": 2.0, "compute_tasks": 1.0, "compute_vs_full_imp": cost,
            "tasks_vs_imp": cost, "compute_macs": 1.0, "macs_vs_imp": 0.05 * cost,
            "wall_vs_imp": cost, "cpu_vs_imp": cost, "eval_macs": 1, "nonzeros": None,
            "layer_densities": None, "exported_bytes": None}


def test_the_report_pairs_by_seed_judges_equivalence_and_flags_theoretical_savings():
    from sparsemeta.experiments.report import cost_table, summarize

    offsets = [0.003, -0.004, 0.001, 0.002, -0.002, 0.0, 0.004, -0.001]
    records = []
    for seed, off in enumerate(offsets):
        ticket = 0.78 + 0.01 * seed  # seeds differ a lot; the pairs do not
        records += [_record("ticket", seed, 0, ticket + 0.03),
                    _record("ticket", seed, 7, ticket),
                    _record("short_imp", seed, 7, ticket + off, cost=0.1),
                    _record("random", seed, 7, ticket - 0.05, cost=0.1)]
    rows = {(r["method"], r["level"]): r for r in summarize(records)}
    short = rows[("short_imp", 7)]
    assert short["equivalence"] == "equivalent" and short["seeds"] == 8
    assert short["diff_vs_ticket"] == pytest.approx(sum(offsets) / 8)
    assert short["diff_vs_dense"] == pytest.approx(sum(offsets) / 8 - 0.03)
    assert rows[("random", 7)]["equivalence"] == "worse"
    assert rows[("ticket", 7)]["equivalence"] is None
    assert rows[("ticket", 7)]["diff_vs_dense"] == pytest.approx(-0.03)
    table = cost_table(list(rows.values()))
    line = next(x for x in table.splitlines() if "| short_imp |" in x)
    assert "equivalent (8 seeds)" in line and "(FLOPs saving theoretical)" in line
    assert "| random |" in table and "worse (8 seeds)" in table
