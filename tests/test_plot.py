import json
import math
import os
import xml.etree.ElementTree as ET

from tinypalm.plot import read_metrics, write_loss_svg

NS = "{http://www.w3.org/2000/svg}"


def parse(path):
    root = ET.parse(path).getroot()
    assert root.tag == NS + "svg"
    return root


def texts(root):
    return [t.text for t in root.iter(NS + "text")]


def test_two_series(tmp_path):
    train = [(s, 10 / (1 + s / 100)) for s in range(0, 1001, 10)]
    val = [(s, 11 / (1 + s / 100)) for s in range(0, 1001, 250)]
    path = tmp_path / "loss.svg"
    write_loss_svg(path, train, val, title="run <1> & co")
    root = parse(path)
    lines = root.findall(f".//{NS}polyline")
    assert len(lines) == 2
    assert len(lines[0].get("points").split()) == len(train)
    assert len(lines[1].get("points").split()) == len(val)
    assert lines[0].get("stroke") != lines[1].get("stroke")
    assert len(root.findall(f".//{NS}circle")) == len(val)  # a dot per validation point
    t = texts(root)
    assert "run <1> & co" in t and "step" in t and "loss" in t and "train" in t and "val" in t
    assert "0" in t and "1000" in t  # round tick labels at the ends of the step axis
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]


def test_points_inside_the_canvas(tmp_path):
    write_loss_svg(tmp_path / "a.svg", [(1, 3.2), (2, 2.9), (3, 2.5)], [])
    root = parse(tmp_path / "a.svg")
    w, h = float(root.get("width")), float(root.get("height"))
    (line,) = root.findall(f".//{NS}polyline")
    for xy in line.get("points").split():
        x, y = map(float, xy.split(","))
        assert 0 < x < w and 0 < y < h


def test_empty_single_and_nonfinite(tmp_path):
    write_loss_svg(tmp_path / "e.svg", [], [])
    root = parse(tmp_path / "e.svg")
    assert "no data yet" in texts(root) and not root.findall(f".//{NS}polyline")

    write_loss_svg(tmp_path / "n.svg", [(0, math.nan), (1, math.inf)], [(5, -math.inf)])
    assert "no data yet" in texts(parse(tmp_path / "n.svg"))

    write_loss_svg(tmp_path / "one.svg", [(0, 4.0)], [])
    root = parse(tmp_path / "one.svg")
    assert len(root.findall(f".//{NS}polyline")) == 1 and len(root.findall(f".//{NS}circle")) == 1

    write_loss_svg(tmp_path / "mix.svg", [(0, 5.0), (1, math.nan), (2, 4.0)], [(2, 4.5)])
    root = parse(tmp_path / "mix.svg")
    pts = root.findall(f".//{NS}polyline")[0].get("points")
    assert len(pts.split()) == 2 and "nan" not in pts


def test_read_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [
        {"split": "train", "step": 0, "loss": 5.0, "lr": 0.01},
        {"split": "train", "step": 10, "loss": 4.0},
        {"split": "val", "step": 10, "loss": 4.5},
        {"split": "other", "step": 10, "loss": 1.0},
        {"split": "train", "step": 20},
    ]
    lines = [json.dumps(r) for r in records]
    lines.insert(2, '{"split": "train", "step": 15, "lo')  # a malformed (half-written) line
    lines.append("[1, 2, 3]")
    path.write_text("\n".join(lines) + "\n")
    train, val = read_metrics(path)
    assert train == [(0, 5.0), (10, 4.0)]
    assert val == [(10, 4.5)]


def test_read_metrics_resume_and_missing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [("train", 10, 4.0), ("train", 20, 3.0), ("train", 10, 3.9), ("val", 20, 3.5)]
    path.write_text("".join(json.dumps({"split": s, "step": t, "loss": l}) + "\n" for s, t, l in rows))
    train, val = read_metrics(path)
    assert train == [(10, 3.9), (20, 3.0)]  # a resumed run's record for a step replaces the old one
    assert read_metrics(tmp_path / "missing.jsonl") == ([], [])
