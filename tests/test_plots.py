"""Figure fixes: identical curves named, the jump annotated only when real, controls ticks."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt

from achilles.analysis import phase_transition
from achilles.plots.comparison import identical_curves, plot_comparison
from achilles.plots.controls import control_bars, plot_controls
from achilles.plots.phase import real_transition


def test_identical_curves_are_grouped_under_the_first_name(tmp_path) -> None:  # noqa: ANN001
    a = [{"n": 1, "ppl": 10.0}, {"n": 2, "ppl": 20.0}]
    methods = {"perturbation": a, "activation": [dict(p) for p in a],
               "gradient": [{"n": 1, "ppl": 10.0}, {"n": 2, "ppl": 21.0}]}
    assert identical_curves(methods) == {
        "perturbation": "perturbation", "activation": "perturbation", "gradient": "gradient"}
    captured = {}
    orig = plt.Axes.legend

    def spy(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        captured["labels"] = self.get_legend_handles_labels()[1]
        return orig(self, *args, **kw)

    plt.Axes.legend = spy
    try:
        plot_comparison({"methods": methods, "baseline": {"ppl": 5.0},
                         "config": {"model": {"model": "/x/models/sink"}}}, tmp_path / "c.png")
    finally:
        plt.Axes.legend = orig
    assert "perturbation = activation (identical)" in captured["labels"]
    assert "gradient" in captured["labels"] and "activation" not in captured["labels"]


def test_jump_is_a_transition_only_when_sharp() -> None:
    step = phase_transition([(1, 0.0), (2, 0.01), (3, 4.0), (4, 4.02)]).to_dict()
    ramp = phase_transition([(n, 0.05 * n) for n in range(1, 21)]).to_dict()
    assert real_transition(step) and not real_transition(ramp)


def test_controls_figure_ticks_do_not_crowd_zero_and_label_what_was_drawn(tmp_path) -> None:  # noqa: ANN001
    controls = {
        "set": "minimal", "n_units": 129,
        "mean_ablation": {"delta_zero": 3.8, "delta_mean": 0.756},
        "random_sets": {"deltas": [1e-4, 2e-4, -5e-5], "mean": 8.3e-5, "sd": 1.2e-4,
                        "drawn": "31 same-module + 98 from other modules (m1)"},
        "fp32": None,
    }
    labels = [b[0] for b in control_bars(controls)]
    assert labels[-1].startswith("random partly other-module") and not any("fp32" in x for x in labels)
    captured = {}
    orig = plt.Figure.savefig

    def spy(self, *args, **kw):  # noqa: ANN001, ANN002, ANN003, ANN202
        captured["ticks"] = list(self.axes[0].get_yticks())
        return orig(self, *args, **kw)

    plt.Figure.savefig = spy
    try:
        plot_controls(controls, tmp_path / "ctl.png", epsilon=1.0)
    finally:
        plt.Figure.savefig = orig
    positive = sorted(t for t in captured["ticks"] if t > 0)
    assert 0.0 in captured["ticks"]
    # linthresh is the decade below the smallest bar (1e-5): the first positive tick is a
    # decade above it, so "0" and the first power of ten never overlap
    assert positive[0] >= 1e-4 and all(math.log10(b / a) >= 0.99 for a, b in zip(positive, positive[1:]))
