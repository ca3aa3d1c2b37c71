"""`vlp compare`: retrieval and task results side by side, with the chance / baseline column."""

from __future__ import annotations

import json

import pytest

from vlp.errors import ConfigError
from vlp.eval.compare import compare_table, find_results, load_results


def record(model, scores, **extra):
    return {"model": model, "num_parameters": 2_500_000, "results": {"test": {"scores": scores, **extra}}}


def test_vqa_results_by_type_with_the_baseline():
    base = {"overall": 31.2, "color": 13.0}
    table = compare_table(
        {
            "co": record("METER", {"overall": 46.2, "color": 50.0}, task="vqa", chance=base),
            "merged": record("METER", {"overall": 40.0, "color": 41.5, "count": 30.0}, task="vqa", chance=base),
        }
    )
    lines = table.splitlines()
    assert lines[0].split() == ["co", "merged", "baseline"]
    assert lines[2].split() == ["parameters", "2.50", "M", "2.50", "M"]
    rows = {line.rsplit(maxsplit=3)[0]: line.split()[-3:] for line in lines[3:-1]}
    assert rows["accuracy, overall"] == ["46.20", "40.00", "31.20"]  # overall first
    assert rows["accuracy, color"] == ["50.00", "41.50", "13.00"]
    assert lines[5].split()[-2:] == ["-", "30.00"] and "count" in lines[5]  # not reported by one run, no baseline
    assert lines[-1].startswith("(task: vqa")


def test_retrieval_rows_and_chance():
    chance = {"i2t_r1": 0.1, "t2i_r1": 0.1, "rmean": 0.5}
    table = compare_table(
        {
            "clip": record("CLIP", {"i2t_r1": 10.0, "t2i_r1": 12.0, "rmean": 30.0}, chance=chance, num_images=10),
            "albef": record(
                "ALBEF",
                {"i2t_r1": 11.0, "itm_i2t_r1": 13.0, "t2i_r1": 9.0, "rmean": 31.0, "itm_acc": 55.0},
                chance=chance,
                num_images=10,
            ),
        }
    )
    row = {line[:26].strip(): line[26:].split() for line in table.splitlines()[3:-1]}
    assert row["image→text R@1   ITC+ITM"] == ["-", "13.00", "0.10"]
    assert row["ITM accuracy (balanced)"] == ["-", "55.00", "50.00"]
    with pytest.raises(ConfigError, match="no results for 'val'"):
        compare_table({"clip": record("CLIP", {})}, source="val")


def test_retrieval_head_ranking_all_pairs_is_labelled_itm():
    chance = {"i2t_r1": 1.0, "rmean": 5.3}
    runs = {
        n: record("ALBEF", {"i2t_r1": v, "rmean": 2 * v}, task="irtr", chance=chance)
        for n, v in (("a", 10.0), ("b", 40.0))
    }
    labels = [line[:26].strip() for line in compare_table(runs).splitlines()[3:-1]]
    assert labels == ["image→text R@1   ITM", "mean R@K       ITM"]
    runs["a"]["results"]["test"]["scores"]["itm_i2t_r1"] = 12.0  # top-k re-ranked: ITC, then ITC+ITM
    assert "image→text R@1   ITC+ITM" in compare_table(runs)


def test_finding_results_files(tmp_path):
    with pytest.raises(ConfigError, match="no test_results.json below it"):
        find_results(tmp_path)
    (tmp_path / "logs/version_0").mkdir(parents=True)
    (tmp_path / "logs/version_0/test_results.json").write_text(json.dumps(record("CLIP", {"acc": 1.0})))
    assert load_results(tmp_path)["model"] == "CLIP"
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(ConfigError, match="not a vlp test results file"):
        load_results(tmp_path / "bad.json")


def test_several_test_sources_give_one_table_each(tmp_path, capsys):
    from vlp.eval.compare import compare_main

    def two_sources(zs, r1):
        image = {"scores": {"zeroshot_top1": zs}, "chance": {"zeroshot_top1": 4.17}, "num_images": 984}
        retrieval = {"scores": {"i2t_r1": r1}, "chance": {"i2t_r1": 0.1}, "num_images": 1000, "num_texts": 5000}
        results = {"test/shapes_image/test": image, "test/shapes_retrieval/test": retrieval}
        return {"model": "FLAVA", "num_parameters": 1_000_000, "results": results}

    for name, values in (("a", (51.8, 7.7)), ("b", (42.9, 5.0))):
        (tmp_path / f"{name}.json").write_text(json.dumps(two_sources(*values)))
    table = compare_main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--names", "FLAVA_C,FLAVA"])
    image, retrieval = table.split("\n\n")
    assert image.splitlines()[0] == "test/shapes_image/test" and retrieval.startswith("test/shapes_retrieval/test")
    row = next(line for line in image.splitlines() if line.startswith("zero-shot top-1"))
    assert row.split()[-3:] == ["51.80", "42.90", "4.17"]
    assert image.splitlines()[-1] == "(984 images; '-': not reported)"
    assert "7.70" in retrieval and "5000 texts" in retrieval
