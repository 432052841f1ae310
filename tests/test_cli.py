from fifa_hf.cli import main


def test_synthetic_command_prints_statistics_and_saves(tmp_path, capsys):
    main(["synthetic", "--num_pairs", "60", "--seed", "2", "--output_dir", str(tmp_path / "rows")])
    out = capsys.readouterr().out
    assert "pairs: 60" in out and "to_preference_pairs: 60 in" in out
    assert (tmp_path / "rows" / "state.json").exists()


def test_demo_compares_methods_against_the_truth(tmp_path, capsys):
    main(["demo", "--num_pairs", "500", "--k", "0.2", "--output_dir", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    for method in ("all scored pairs", "fifa", "margin", "qsd", "random"):
        assert f"| {method} |" in out
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "simulation" in report and "label agreement with truth" in report
    assert (tmp_path / "demo" / "selection_metrics.png").exists()
    assert (tmp_path / "demo" / "subset" / "README.md").exists()
