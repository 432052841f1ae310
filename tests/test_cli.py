import json

import pandas as pd
import pytest

from fifa_hf.cli import main
from fifa_hf.world.demo import pick_default_method


def test_synthetic_command_prints_statistics_and_saves(tmp_path, capfd):
    main(["synthetic", "--num_pairs", "60", "--seed", "2", "--output_dir", str(tmp_path / "rows")])
    out, err = capfd.readouterr()
    assert "pairs: 60" in out and "to_preference_pairs: 60 in" in out
    assert "Filter" not in err  # no bare bar from an internal step
    assert (tmp_path / "rows" / "state.json").exists()


def test_demo_compares_methods_over_worlds_against_the_truth(tmp_path, capsys):
    output = tmp_path / "demo"
    main(["demo", "--num_pairs", "600", "--k", "0.2", "--num_worlds", "2", "--output_dir", str(output)])
    out = capsys.readouterr().out
    for method in ("random", "margin", "qsd", "fifa", "setwise", "oracle"):
        assert f"| {method} |" in out
    results = json.loads((output / "results.json").read_text())
    assert set(results) == {"default_method", "methods"}
    assert list(results["methods"]) == ["random", "margin", "qsd", "fifa", "setwise", "oracle"]
    for metrics in results["methods"].values():
        assert list(metrics) == ["agreement", "true_gap", "junk_share", "unsafe_share", "distinct_prompts"]
        assert all(set(value) == {"mean", "sd"} for value in metrics.values())
    means = {m: {k: v["mean"] for k, v in metrics.items()} for m, metrics in results["methods"].items()}
    assert all(means["oracle"]["true_gap"] >= means[m]["true_gap"] for m in means)  # the upper bound
    assert means["setwise"]["junk_share"] == 0 and means["setwise"]["unsafe_share"] == 0  # the offline gate
    assert results["methods"]["random"]["true_gap"]["sd"] > 0  # two worlds, two values
    default = results["default_method"]
    assert f"default method by the rule of docs/selection.md: {default}" in out
    report = (output / "report.md").read_text()
    assert "simulation" in report and "not** the paper's LLM" in report and f"`{default}`" in report
    assert (output / "selection_metrics.png").exists()
    card = (output / "subset" / "README.md").read_text()
    assert f"method: {default}" in card


def test_filter_and_select_setwise_record_the_quality_gate(tmp_path, capsys):
    from fifa_hf.world.demo import SIMULATED_REWARD_COLUMNS, add_simulated_proxy_reward
    from fifa_hf.world.synthetic import make_synthetic_pickapic

    rows = add_simulated_proxy_reward(make_synthetic_pickapic(300, seed=5, image_size=16), 0.15, seed=5)
    rows.save_to_disk(tmp_path / "source")
    out = tmp_path / "setwise"
    main(
        [
            "filter", "--dataset_name", str(tmp_path / "source"), "--output_dir", str(out), "--reward_type", "precomputed",
            "--reward_columns", ",".join(SIMULATED_REWARD_COLUMNS), "--quality_scorer", "offline", "--k", "30",
        ]
    )  # fmt: skip
    scores = pd.read_parquet(out / "scores.parquet")
    report = json.loads((out / "report.json").read_text())
    gated = int(((scores["drop_reason"] == "") & (scores["quality"] < 0.5)).sum())
    assert gated > 0 and f"quality gate (quality >= 0.5) removed {gated} pairs" in capsys.readouterr().out
    assert report["selection"] == {
        "method": "setwise", "k": 30.0, "quality_threshold": 0.5, "diminishing_returns": 0.5, "setwise_base": "margin",
        "quality_scorer": "offline", "gated_out": gated,
    }  # fmt: skip
    kinds = pd.Series(rows["prompt_kind"])
    assert scores["selected"].sum() == 30 and (kinds[scores.loc[scores["selected"], "row_id"]] == "clean").all()
    assert "diversity" not in scores  # setwise does not read it, so it is not computed
    card = (out / "README.md").read_text()
    assert (
        "method: setwise" in card
        and "quality_threshold: 0.5" in card
        and "offline scorer (offline, not an LLM)" in card
    )

    main(["select", "--scores", str(out), "--output_dir", str(tmp_path / "again"), "--diminishing_returns", "0"])
    again = json.loads((tmp_path / "again" / "report.json").read_text())
    assert again["selection"]["diminishing_returns"] == 0.0 and again["selected"] == 30


def summary(**means):
    return {m: {k: {"mean": v, "sd": 0.0} for k, v in values.items()} for m, values in means.items()}


def test_default_method_rule_of_docs_selection():
    def row(gap, junk, unsafe, prompts):
        return {"true_gap": gap, "junk_share": junk, "unsafe_share": unsafe, "distinct_prompts": prompts}

    base = {"margin": row(0.70, 0.05, 0.05, 100), "qsd": row(0.71, 0.05, 0.05, 100)}
    # cleaner but 0.021 below margin's true gap: does not qualify; qsd ties margin on shares, wins on gap
    assert pick_default_method(summary(**base, fifa=row(0.679, 0.0, 0.0, 120), setwise=row(0.6, 0, 0, 90))) == "qsd"
    # within 0.02, cleaner, as many prompts: wins on the share, not on the gap
    assert pick_default_method(summary(**base, fifa=row(0.5, 0.2, 0, 100), setwise=row(0.681, 0.0, 0.0, 100))) == (
        "setwise"
    )
    # fewer prompts than margin: does not qualify
    assert pick_default_method(summary(**base, fifa=row(0.5, 0.2, 0, 100), setwise=row(0.75, 0, 0, 99))) == "qsd"


def test_mistakes_on_the_command_line_are_usage_errors_without_a_traceback(tmp_path, capsys):
    def usage_error(argv):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        return capsys.readouterr().err

    assert (
        "the first argument must be a command (demo, evaluate, filter, select, synthetic, train), got '--k'"
        in usage_error(["--k", "3"])
    )
    message = usage_error(["filter", "--dataset_name", "rows", "--k", "1.5"])  # checked before any model loads
    assert "fifa-hf filter: error: k must be a positive count or a fraction in (0, 1), got 1.5" in message
    (tmp_path / "notes.txt").write_text("mine")
    message = usage_error(["filter", "--dataset_name", "rows", "--output_dir", str(tmp_path), "--method", "margin"])
    assert "is not empty and not a fifa-hf output (it holds notes.txt)" in message and "Traceback" not in message


def exits_with_usage_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    error = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in error
    return error


def test_a_mistake_in_select_exits_2_naming_it(tmp_path, capsys):
    main(["synthetic", "--num_pairs", "24", "--output_dir", str(tmp_path / "rows")])
    main([
        "filter", "--dataset_name", str(tmp_path / "rows"), "--output_dir", str(tmp_path / "filtered"),
        "--reward_type", "precomputed", "--reward_columns", "true_reward_0,true_reward_1", "--method", "margin",
        "--alpha", "0", "--k", "4",
    ])  # fmt: skip
    not_filtered = ["select", "--scores", str(tmp_path / "rows"), "--output_dir", str(tmp_path / "o")]
    assert "is not the output directory of a finished `fifa-hf filter` run" in exits_with_usage_error(
        not_filtered, capsys
    )
    bogus = [
        "select",
        "--scores",
        str(tmp_path / "filtered"),
        "--output_dir",
        str(tmp_path / "o"),
        "--method",
        "bogus",
    ]
    assert "method must be one of" in exits_with_usage_error(bogus, capsys)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--reward", "pickscore", "--category", "Animalz"], "Unknown PartiPrompts"),
        (["--reward", "nosuch"], "Unknown reward"),
        (["--max_prompts", "0"], "--max_prompts must be at least 1, got 0"),  # it evaluated every prompt
        (["--num_images_per_prompt", "0"], "--num_images_per_prompt must be at least 1, got 0"),
    ],
)
def test_a_mistake_in_evaluate_exits_2_naming_it_before_any_model_loads(flags, message, capsys):
    assert message in exits_with_usage_error(["evaluate", "--model_name_or_path", "x", *flags], capsys)
