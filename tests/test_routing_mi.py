"""Routing analytics in bits and the label assignment, without torch: the mutual information
between expert_label and top-1 expert, `moe.label_routing`'s experts per label, and how `status`
and `plot` read `routing_mi_bits` from metrics.jsonl."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestrator.lifecycle.plot import metric_series
from orchestrator.lifecycle.status import routing_mi, routing_mi_line
from orchestrator.rundir import reports
from orchestrator.spec.schema import LabelRoutingConfig, RunConfig
from worker.metrics import mutual_information_bits

LABELS = ["arithmetic", "definition", "factual_lookup", "list_recall", "unit_conversion"]


@pytest.mark.parametrize(
    ("joint", "bits"),
    [
        ([[2, 4], [4, 8]], 0.0),  # the expert does not depend on the label (p(l, e) = p(l) p(e))
        ([[5, 5, 5, 5]] * 3, 0.0),  # every label spread evenly
        ([[7, 0], [0, 7]], 1.0),  # two labels, each to its own expert
        ([[3, 0, 0, 0], [0, 3, 0, 0], [0, 0, 3, 0], [0, 0, 0, 3]], 2.0),  # log2(4): a perfect mapping
        ([[0, 0], [0, 0]], 0.0),  # nothing routed yet
    ],
)
def test_mutual_information_of_constructed_routings(joint: list[list[int]], bits: float) -> None:
    assert mutual_information_bits(joint) == pytest.approx(bits, abs=1e-12)


def test_five_labels_on_four_experts_give_the_entropy_of_the_expert() -> None:
    # labels 0 and 4 share expert 0: I = H(expert) = H(2/5, 1/5, 1/5, 1/5) < log2(4)
    joint = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 0, 0, 0]]
    entropy = -(0.4 * math.log2(0.4) + 3 * 0.2 * math.log2(0.2))
    assert mutual_information_bits(joint) == pytest.approx(entropy)
    assert entropy < 2.0


@pytest.mark.parametrize(
    ("labels", "experts", "expected"),
    [
        (LABELS, 4, {"arithmetic": [0], "definition": [1], "factual_lookup": [2], "list_recall": [3],
                     "unit_conversion": [0]}),
        (["a", "b"], 4, {"a": [0, 2], "b": [1, 3]}),  # fewer labels than experts: round-robin
        (["a", "b", "c"], 8, {"a": [0, 3, 6], "b": [1, 4, 7], "c": [2, 5]}),
    ],
)  # fmt: skip
def test_auto_assignment_deals_labels_round_robin(
    labels: list[str], experts: int, expected: dict[str, list[int]]
) -> None:
    assert LabelRoutingConfig(weight=0.1).assignment(labels, experts) == expected


def test_an_explicit_assignment_guides_only_the_labels_it_names() -> None:
    cfg = LabelRoutingConfig(weight=0.1, experts={"arithmetic": [1, 0], "other": [2]})
    assert cfg.assignment(LABELS, 4) == {"arithmetic": [0, 1]}


def test_an_expert_id_past_num_experts_is_refused_with_the_range() -> None:
    expected = r"moe.label_routing.experts: expert ids \[4\] do not exist.*0..3"
    with pytest.raises(ValidationError, match=expected):
        RunConfig.model_validate(
            {"moe": {"num_experts": 4, "label_routing": {"weight": 0.1, "experts": {"a": [4]}}},
             "training": {"precision": "fp32"}}
        )  # fmt: skip


def _metrics(run_dir: Path) -> None:
    for step, mi in ((5, (0.1, 0.05)), (10, (0.8, 0.6))):
        reports.append_metrics(
            run_dir,
            {"step": step, "loss": 3.0, "expert_load": {}, "label_routing": {},
             "routing_mi_bits": {"0": mi[0], "1": mi[1]}, "routing_mi_answer_bits": {"0": 0.9, "1": 0.7},
             "routing_mi_max_bits": 2.0},
        )  # fmt: skip
    reports.append_eval(run_dir, 10, 2.5)


def test_status_shows_the_newest_routing_mi_per_layer_with_its_ceiling(tmp_path: Path) -> None:
    assert routing_mi(tmp_path) is None
    _metrics(tmp_path)
    mi = routing_mi(tmp_path)
    assert mi == {
        "step": 10, "max_bits": 2.0, "bits": {"0": 0.8, "1": 0.6}, "answer_bits": {"0": 0.9, "1": 0.7}
    }  # fmt: skip
    assert routing_mi_line(mi) == (
        "  routing MI (expert_label; top-1 expert), step 10: layer 0 0.80, layer 1 0.60 of 2 bits"
        " (answer tokens 0.90, 0.70)"
    )


def test_plot_series_hold_the_mi_per_layer(tmp_path: Path) -> None:
    _metrics(tmp_path)
    s = metric_series(tmp_path)
    assert s.mi == {"0": ([5, 10], [0.1, 0.8]), "1": ([5, 10], [0.05, 0.6])}
    assert s.mi_answer["1"] == ([5, 10], [0.7, 0.7]) and s.mi_max == 2.0
