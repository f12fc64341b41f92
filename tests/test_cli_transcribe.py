"""``audioq transcribe``: local files through the real engine, from the command line."""

from __future__ import annotations

import json

import numpy as np
import soundfile as sf

from conftest import make_tone
from producer.cli import main


def test_transcribe_json_lines_for_several_formats(tiny_checkpoint, tmp_path, capsys):
    model = str(tiny_checkpoint("e2b"))
    wav, flac = tmp_path / "a.wav", tmp_path / "b.flac"
    sf.write(wav, make_tone(1.2, sr=44100, channels=2), 44100)  # stereo 44.1 kHz: mixed and resampled
    sf.write(flac, make_tone(2.0, sr=16000), 16000)
    code = main(["transcribe", str(wav), str(flac), "--model", model, "--max-new-tokens", "5", "--json"])
    assert code == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == [str(wav), str(flac)]
    for line, seconds in zip(lines, (1.2, 2.0)):
        assert isinstance(line["text"], str)
        assert 1 <= len(line["token_ids"]) == line["tokens"] <= 5 and all(isinstance(t, int) for t in line["token_ids"])
        assert line["audio_tokens"] == int(np.ceil((np.floor((seconds * 16000 - 161) / 160) + 1) / 4))
        assert line["seconds"] > 0


def test_transcribe_reports_bad_files_and_goes_on(tiny_checkpoint, tmp_path, capsys):
    model = str(tiny_checkpoint("e2b"))
    text, good = tmp_path / "notes.txt", tmp_path / "ok.wav"
    missing, folder = tmp_path / "missing.wav", tmp_path / "folder.wav"
    folder.mkdir()
    text.write_text("not audio at all\n" * 50)
    sf.write(good, make_tone(1.0), 16000)
    code = main(["transcribe", str(missing), str(folder), str(text), str(good), "--model", model,
                 "--max-new-tokens", "3", "--json"])
    assert code == 1
    lines = {json.loads(x)["file"]: json.loads(x) for x in capsys.readouterr().out.splitlines()}
    assert lines[str(missing)]["error"] == lines[str(folder)]["error"] == "audio_not_found"
    assert lines[str(text)]["error"] == "unsupported_format"
    assert "text" in lines[str(good)]


def test_transcribe_honours_the_worker_limits(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    wav = tmp_path / "a.wav"
    sf.write(wav, make_tone(3.0), 16000)
    model = str(tiny_checkpoint("e2b"))
    monkeypatch.setenv("AUDIOQ_MAX_AUDIO_SECONDS", "2.5")
    assert main(["transcribe", str(wav), "--model", model, "--json", "--max-new-tokens", "2"]) == 1
    assert json.loads(capsys.readouterr().out)["error"] == "audio_too_long"
    monkeypatch.setenv("AUDIOQ_MAX_NEW_TOKENS_LIMIT", "4")
    monkeypatch.setenv("AUDIOQ_DEFAULT_MAX_NEW_TOKENS", "2")
    assert main(["transcribe", str(wav), "--model", model, "--max-new-tokens", "5"]) == 3
    assert "max_new_tokens_limit" in capsys.readouterr().err


def test_transcribe_plain_text_and_missing_model(tiny_checkpoint, tmp_path, capsys):
    wav = tmp_path / "a.wav"
    sf.write(wav, make_tone(0.8), 16000)
    assert main(["transcribe", str(wav), "--model", str(tiny_checkpoint("e2b")), "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out.count("\n") == 1
    assert main(["transcribe", str(wav), "--model", str(tmp_path / "missing")]) == 3
    assert "no such checkpoint directory" in capsys.readouterr().err


def test_model_may_come_from_the_environment(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    wav = tmp_path / "a.wav"
    sf.write(wav, make_tone(0.8), 16000)
    monkeypatch.setenv("AUDIOQ_MODEL", str(tiny_checkpoint("e2b")))
    assert main(["transcribe", str(wav), "--max-new-tokens", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["audio_tokens"] == 20


def test_many_files_run_batched_with_the_tokens_each_gets_alone(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """One engine stream for all the files (two open at once here); results in the given order."""
    model = str(tiny_checkpoint("e2b"))
    files = []
    for i, seconds in enumerate([0.6, 3.0, 1.4, 7.5, 2.2]):
        files.append(tmp_path / f"clip{i}.wav")
        sf.write(files[-1], make_tone(seconds, freq=150 + 70 * i, seed=i), 16000)
    files.insert(2, tmp_path / "missing.wav")
    args = ["--model", model, "--max-new-tokens", "12", "--json"]
    alone = {}
    for file in files:
        main(["transcribe", str(file), *args])
        alone[str(file)] = json.loads(capsys.readouterr().out)
    monkeypatch.setenv("AUDIOQ_BATCH_MAX_JOBS", "2")
    assert main(["transcribe", *map(str, files), *args]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["file"] for line in lines] == [str(f) for f in files]
    for line in lines:
        same = alone[line["file"]]
        assert line.get("token_ids") == same.get("token_ids") and line.get("error") == same.get("error")


def test_output_dir_refuses_files_whose_outputs_would_overwrite_each_other(tiny_checkpoint, tmp_path, capsys):
    model = str(tiny_checkpoint("e2b"))
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for folder in ("a", "b"):
        sf.write(tmp_path / folder / "talk.wav", make_tone(0.5), 16000)
    out = tmp_path / "out"
    code = main(["transcribe", str(tmp_path / "a" / "talk.wav"), str(tmp_path / "b" / "talk.wav"), "--model", model,
                 "--output-dir", str(out)])
    assert code == 3 and "talk" in capsys.readouterr().err and not out.exists()
