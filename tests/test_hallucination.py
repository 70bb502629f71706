"""Yes/no probe metrics and amplification on probes (tiny random thinker)."""

import math

import pytest

from analyses import hallucination as h
from hooked_av import HookedAVModel, SinkConstants
from hooked_av.recipes.scoring import AnswerCandidates
from model_zoo.tiny import build_inputs


def test_binary_metrics_by_hand():
    pred = ["Yes", "Yes", "No", "No", "Yes"]
    gold = ["Yes", "No", "No", "Yes", "Yes"]
    m = h.binary_metrics(pred, gold)  # tp 2, fp 1, fn 1, tn 1
    assert (m.n, m.accuracy, m.precision, m.recall, m.yes_ratio) == (5, 0.6, 2 / 3, 2 / 3, 0.6)
    assert m.f1 == pytest.approx(2 / 3)
    none_yes = h.binary_metrics(["No", "No"], ["No", "Yes"])
    assert math.isnan(none_yes.precision) and none_yes.recall == 0 and math.isnan(none_yes.f1)
    with pytest.raises(ValueError, match="'Yes' or 'No'"):
        h.binary_metrics(["yes"], ["Yes"])
    with pytest.raises(ValueError, match="1 predictions for 2"):
        h.binary_metrics(["Yes"], ["Yes", "No"])


def test_probe_evaluation_with_amplification(hf_thinker):
    model = HookedAVModel.from_hf_model(hf_thinker, sinks=SinkConstants(dims=(7, 11), tau=1.5))
    items = [{"video_id": str(i), "task": t, "text": "?", "label": lab}
             for i, (t, lab) in enumerate([("AV Matching", "Yes"), ("AV Matching", "No"),
                                           ("AV Hallucination (Video)", "No")])]
    yes, no = AnswerCandidates("Yes", (40, 41)), AnswerCandidates("No", (50, 51))
    out = h.evaluate_probes(model, items, lambda it: build_inputs("av", seed=int(it["video_id"])), yes, no,
                            alphas=(0.0, 0.5), layers=[1, 2])
    assert set(out["overall"]) == {"0.0", "0.5"} and out["n"] == 3
    assert set(out["by_task"]["0.0"]) == {"AV Matching", "AV Hallucination (Video)"}
    plain = [h.answer_yes_no(model, build_inputs("av", seed=i), yes, no) for i in range(3)]
    assert out["overall"]["0.0"]["yes_ratio"] == pytest.approx(plain.count("Yes") / 3)
    keys = h.cross_modal_sinks(model, build_inputs("av", seed=0))
    mm = model.modality_map(**build_inputs("av", seed=0))
    assert all(int(mm.modality[0, k]) in (1, 2) for k in keys)  # audio or video tokens only
