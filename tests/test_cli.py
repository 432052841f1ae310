from fifa_hf.cli import main


def test_synthetic_command_prints_statistics_and_saves(tmp_path, capsys):
    main(["synthetic", "--num_pairs", "60", "--seed", "2", "--output_dir", str(tmp_path / "rows")])
    out = capsys.readouterr().out
    assert "pairs: 60" in out and "to_preference_pairs: 60 in" in out
    assert (tmp_path / "rows" / "state.json").exists()


def test_help_lists_commands(capsys):
    main(["--help"])
    assert "synthetic" in capsys.readouterr().out
