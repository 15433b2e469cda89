"""``lorapipe generate``: the job and the files a run writes."""

from __future__ import annotations

import argparse
import json
import logging
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from lora_fixtures import selected_lora_folder
from PIL import Image

from lorapipe import cli, lora_format, store
from lorapipe.errors import ConfigError, InputError
from lorapipe.generation.infotext import parse_parameters
from lorapipe.stages.generate import (
    GenerateConfig,
    chosen_lora,
    config_from_args,
    config_values,
    configure_parser,
    load_job,
    run,
    with_lora_tag,
    with_trained_lora,
)

# --------------------------------------------------------------------------- the job


def test_a_job_file_sets_the_grid_and_the_base_model(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(
        "base_model: models/tiny-sd\n"
        "loras: {film_style: out/selected}\n"
        "prompts: ['street, <lora:film_style:0.7>']\n"
        "negative_presets: [portrait, base+style]\n"
        "lora_scales: [0.5, 1]\n"
        "cfg_scales: [7, 8.5]\n"
        "seeds: [1, 2, 3]\n"
        "sampler: Euler a\n"
        "steps: 30\n"
        "width: 512\n"
        "height: 768\n"
    )
    values, base_model = load_job(str(job))
    config = GenerateConfig(**values)
    config.validate()
    assert base_model == "models/tiny-sd"
    assert config.lora_scales == [0.5, 1.0] and config.cfg_scales == [7.0, 8.5]
    # one sampler and one step count, as job files wrote them before they could be lists
    assert (config.width, config.height, config.samplers, config.steps) == (
        512,
        768,
        ["Euler a"],
        [30],
    )
    json_job = tmp_path / "job.json"
    json_job.write_text(json.dumps({"prompts": "one prompt", "seeds": 4}))
    assert load_job(str(json_job)) == ({"prompts": ["one prompt"], "seeds": [4]}, None)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"seeds": []}, "job.yaml: seeds is empty; give at least one seed"),
        ({"prompts": []}, "job.yaml: prompts is empty; give at least one prompt"),
        ({"lora_scales": []}, "lora_scales is empty"),
        (
            {"samplers": ["Euler a", "DPM++ 9M"]},
            "samplers 'DPM++ 9M' is unknown; use one of DPM++ 2M Karras, DPM++ 2M,",
        ),
        ({"width": 500}, "width 500 must be a positive multiple of 8"),
        ({"seeds": [1, 2, 1]}, "seeds lists 1 twice"),
        ({"steps": [20, 20]}, "steps lists 20 twice"),
        ({"steps": [0]}, "steps value 0 must be between 1 and 1000"),
        ({"cfg_scales": [0.5]}, "cfg_scales value 0.5 must be between 1.0 and 100.0"),
        (
            {"height": 100000},
            "job.yaml: height 100000 is larger than max_image_side (4096 px per side); give "
            "sides of at most 4096, or raise max_image_side (--max-image-side) for a device",
        ),
        ({"width": 8192, "max_image_side": 4096}, "width 8192 is larger than max_image_side"),
        ({"max_image_side": 4}, "max_image_side value 4 must be between 8 and 16384"),
    ],
)
def test_a_grid_that_cannot_run_is_a_one_line_config_error(values: dict, message: str) -> None:
    config = GenerateConfig(**{"prompts": ["a cat"], **values})
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        config.validate("job.yaml")
    assert "\n" not in str(error.value)


def command_line(*flags: str) -> argparse.Namespace:
    """``lorapipe generate`` flags as the command line parses them."""
    parser = argparse.ArgumentParser()
    configure_parser(parser)
    return parser.parse_args(["--base-model", "models/tiny-sd", "--out", "review", *flags])


def test_samplers_and_steps_take_one_value_or_several_in_a_job_or_flags(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("prompts: [a cat]\nsamplers: [Euler a, DDIM]\nsteps: [10, 30]\n")
    values, _ = load_job(str(job))
    assert (values["samplers"], values["steps"]) == (["Euler a", "DDIM"], [10, 30])
    flags = command_line("--prompt", "a cat", "--sampler", "Euler a", "--steps", "12")
    config = config_from_args(flags)[0]
    assert (config.samplers, config.steps) == (["Euler a"], [12])
    config = config_from_args(command_line("--prompt", "a cat", "--steps", "10", "20"))[0]
    assert config.steps == [10, 20]
    assert GenerateConfig(prompts=["a cat"], steps=8).steps == [8]  # Python callers, as before
    job.write_text("prompts: [a cat]\nsampler: Euler a\nsamplers: [DDIM]\n")
    with pytest.raises(ConfigError, match="'samplers' and 'sampler' are the same key; keep one"):
        load_job(str(job))


def test_sizes_come_from_the_job_file_or_repeated_size_flags(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("prompts: [a portrait]\nsizes: [512x768, 768x512]\n")
    values, _ = load_job(str(job))
    assert GenerateConfig(**values).image_sizes() == [(512, 768), (768, 512)]
    flags = command_line("--prompt", "a portrait", "--size", "512x768", "--size", "768x512")
    assert config_from_args(flags)[0].sizes == ["512x768", "768x512"]
    flags = command_line("--job", str(job), "--size", "640x640")
    assert config_from_args(flags)[0].sizes == ["640x640"]  # a flag replaces the job's list


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"sizes": ["512by768"]},
            "job.yaml: sizes '512by768' is not WIDTHxHEIGHT; write e.g. 512x768",
        ),
        ({"sizes": ["512"]}, "job.yaml: sizes '512' is not WIDTHxHEIGHT; write e.g. 512x768"),
        (
            {"sizes": ["500x768"]},
            "job.yaml: sizes '500x768': each side must be a positive multiple of 8, e.g. 496x768",
        ),
        ({"sizes": ["0x768"]}, "each side must be a positive multiple of 8, e.g. 8x768"),
        ({"sizes": ["512x768", "512X768"]}, "job.yaml: sizes lists 512x768 twice; keep one"),
        (
            {"sizes": ["512x768", "512x100000"]},
            "job.yaml: sizes '512x100000' is larger than max_image_side (4096 px per side)",
        ),
        (
            {"sizes": ["512x768"], "width": 512},
            "job.yaml: sizes and width/height are both set; give the sizes only "
            "(e.g. [512x768, 768x512]) or width and height only",
        ),
    ],
)
def test_a_size_that_cannot_run_is_a_one_line_config_error(values: dict, message: str) -> None:
    config = GenerateConfig(prompts=["a cat"], **values)
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        config.validate("job.yaml")
    assert "\n" not in str(error.value)


def test_max_image_side_lets_a_device_that_can_render_larger_sizes_do_so() -> None:
    GenerateConfig(prompts=["a cat"], sizes=["512x8192"], max_image_side=8192).validate()
    GenerateConfig(prompts=["a cat"], height=8192, max_image_side=8192).validate()
    flags = command_line("--prompt", "a cat", "--height", "8192", "--max-image-side", "8192")
    assert config_from_args(flags)[0].height == 8192


def test_a_bad_size_flag_is_a_one_line_config_error() -> None:
    message = "command line: sizes '512' is not WIDTHxHEIGHT; write e.g. 512x768"
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        config_from_args(command_line("--prompt", "a cat", "--size", "512"))


def test_a_misspelled_job_key_gets_a_suggestion() -> None:
    with pytest.raises(ConfigError, match="unknown key 'cfg_scale'; did you mean 'cfg_scales'"):
        config_values({"cfg_scale": [7]}, "job.yaml")
    with pytest.raises(ConfigError, match="key 'seeds' must be a whole number"):
        config_values({"seeds": [1.5]}, "job.yaml")


# --------------------------------------------------------------------------- a whole run


JOB = """\
prompts:
  - "street photography, 35mm film grain, muted colors, soft focus, <lora:film_style:0.7>"
  - "a red dog under a blue sky, <lora:film_style:0.7>"
negative_presets: [portrait, landscape]
lora_scales: [0.5, 1.0]
cfg_scales: [7, 9]
seeds: [1, 2]
steps: 3
"""


def test_cli_generate_writes_images_sheets_index_and_report(
    tiny_model_dir: Path, lora_dir: Path, tmp_path: Path, capsys
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    out = tmp_path / "out"
    argv = ["generate", "--base-model", str(tiny_model_dir), "--lora", str(lora_dir)]
    assert cli.main([*argv, "--job", str(job), "--out", str(out)]) == 0
    assert f"open {out / 'report.html'}" in capsys.readouterr().out

    images = sorted((out / "images").glob("*.png"))
    assert len(images) == 2 * 2 * 2 * 2 * 2
    with Image.open(out / "images" / "p01_portrait_64x64_lora1_cfg9_seed2.png") as image:
        parameters = parse_parameters(image.info["parameters"])
    assert parameters["prompt"].endswith("soft focus, <lora:film_style:1>")
    assert "garish colors" in parameters["negative_prompt"]
    assert "grainy" not in parameters["negative_prompt"]  # the prompt asks for film grain
    assert (parameters["Steps"], parameters["Sampler"], parameters["Size"]) == (
        "3",
        "DPM++ 2M Karras",
        "64x64",
    )
    kohya_hash = lora_format.kohya_hashes(
        *lora_format.load_lora_state_dict(str(lora_dir / "film_style.safetensors"))[:2]
    )[0]
    assert parameters["Lora hashes"] == f"film_style: {kohya_hash[:12]}"

    # LoRA scale across, seed down (the default axes): a sheet per prompt x preset x CFG
    sheets = sorted(p.name for p in (out / "sheets").glob("*.png"))
    assert sheets == sorted(
        f"p0{prompt}_{preset}_64x64_cfg{cfg}.png"
        for prompt in (1, 2)
        for preset in ("portrait", "landscape")
        for cfg in (7, 9)
    )

    index = pq.read_table(out / "index.parquet").to_pylist()
    assert len(index) == 32
    assert {row["file"] for row in index} == {f"images/{p.name}" for p in images}
    first = index[0]
    assert first["lora_scale"] == 0.5 and first["loras"] == [
        {"name": "film_style", "te_weight": 0.5, "unet_weight": 0.5}
    ]
    assert first["sharpness"] > 0 and 0 < first["mean_luminance"] < 1
    assert first["clip_score"] is None

    report = json.loads((out / "report.json").read_text())
    rules = {lint["rule"] for lint in report["lints"]}
    assert {"resolve_positive_conflicts", "check_term_count", "adapt_to_lora_scale"} <= rules
    assert len(report["metrics"]) == 2 * 2 * 2  # preset x LoRA scale x CFG
    html = (out / "report.html").read_text()
    assert html.count("data:image/jpeg;base64,") == 8
    assert "lorapipe generate --job" in html

    # the written job reproduces the run
    assert cli.main(["generate", "--job", str(out / "job.yaml"), "--out", str(out)]) == 0
    rerun = pq.read_table(out / "index.parquet").to_pylist()
    assert [row["sharpness"] for row in rerun] == [row["sharpness"] for row in index]


def test_a_grid_of_two_sizes_renders_each_and_says_so_everywhere(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = GenerateConfig(prompts=["a red dog"], sizes=["64x96", "96x64"], steps=2)
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="lorapipe.stages.generate"):
        report = run(str(tiny_model_dir), str(out), config)

    # said before the first image: how many images, in how many UNet batches
    assert "generate: 1 prompt x 2 sizes = 2 images in 2 batches of up to 8" in caplog.messages

    for name, size in [
        ("p01_base_64x96_lora-tagged_cfg7_seed1.png", (64, 96)),
        ("p01_base_96x64_lora-tagged_cfg7_seed1.png", (96, 64)),
    ]:
        with Image.open(out / "images" / name) as image:
            assert image.size == size
            assert parse_parameters(image.info["parameters"])["Size"] == "{}x{}".format(*size)
    index = pq.read_table(out / "index.parquet").to_pylist()
    assert [(row["width"], row["height"]) for row in index] == [(64, 96), (96, 64)]
    assert report["sheets"] == ["sheets/p01_base_64x96.png", "sheets/p01_base_96x64.png"]
    assert [entry["size"] for entry in report["metrics"]] == ["64x96", "96x64"]
    html = (out / "report.html").read_text()
    assert "prompt 1 / base / 64x96" in html and "prompt 1 / base / 96x64" in html
    assert "<dt>sizes</dt><dd>64x96, 96x64</dd>" in html
    assert "- sizes: 64x96, 96x64" in (out / "report.md").read_text()


def test_samplers_and_steps_on_the_grid_render_each_image_with_its_own(
    tiny_model_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = GenerateConfig(prompts=["a red dog"], samplers=["Euler", "DDIM"], steps=[1, 2])
    with caplog.at_level(logging.INFO, logger="lorapipe.stages.generate"):
        report = run(str(tiny_model_dir), str(tmp_path / "grid"), config)
    assert "1 prompt x 2 samplers x 2 step counts = 4 images in 4 batches" in caplog.text
    images = {}
    for row in pq.read_table(tmp_path / "grid" / "index.parquet").to_pylist():
        with Image.open(tmp_path / "grid" / row["file"]) as image:
            parameters = parse_parameters(image.info["parameters"])
            images[row["sampler"], row["steps"]] = np.asarray(image)
        assert (parameters["Sampler"], int(parameters["Steps"])) == (row["sampler"], row["steps"])
    assert sorted(images) == [("DDIM", 1), ("DDIM", 2), ("Euler", 1), ("Euler", 2)]
    assert [(row["sampler"], row["steps"]) for row in report["metrics"]] == [
        ("Euler", 1), ("Euler", 2), ("DDIM", 1), ("DDIM", 2),
    ]  # fmt: skip
    # the default sheets (LoRA scale x seed) are one per sampler x steps
    assert report["sheets"] == [
        f"sheets/p01_base_64x64_{sampler}_steps{steps}.png"
        for sampler in ("Euler", "DDIM")
        for steps in (1, 2)
    ]
    # the DDIM, 2-step image of the grid is the one a DDIM, 2-step job renders alone
    alone = GenerateConfig(prompts=["a red dog"], samplers=["DDIM"], steps=[2])
    run(str(tiny_model_dir), str(tmp_path / "alone"), alone)
    (path,) = (tmp_path / "alone" / "images").glob("*.png")
    assert path.name == "p01_base_64x64_lora-tagged_cfg7_seed1.png"  # one of each: no suffix
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image), images["DDIM", 2])
    assert not np.array_equal(images["DDIM", 2], images["Euler", 2])


def test_a_run_without_sizes_records_the_native_size_for_a_rerun(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run(str(tiny_model_dir), str(out), GenerateConfig(prompts=["a red dog"], steps=1))
    values, _ = load_job(str(out / "job.yaml"))
    assert (values["sizes"], values["width"], values["height"]) == (["64x64"], None, None)


def test_cli_errors_are_one_line_and_leave_no_output(
    tiny_model_dir: Path, tmp_path: Path, capsys
) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("prompts: [a dog]\nseeds: []\n")
    out = tmp_path / "out"
    argv = ["generate", "--base-model", str(tiny_model_dir), "--job", str(job), "--out", str(out)]
    assert cli.main(argv) == 2
    error = capsys.readouterr().err.strip()
    assert error == f"lorapipe generate: error: {job}: seeds is empty; give at least one seed"
    job.write_text("prompts: ['a (dog']\n")
    assert cli.main(argv) == 2
    assert "prompt 1, column 3: '(' is never closed" in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == [job]


def test_an_output_folder_with_other_files_is_not_replaced(tiny_model_dir: Path, tmp_path: Path):
    (tmp_path / "notes.txt").write_text("mine")
    config = GenerateConfig(prompts=["a dog"], steps=1)
    with pytest.raises(ConfigError, match="not a lorapipe generate output"):
        run(str(tiny_model_dir), str(tmp_path), config)
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_generate_reads_a_kohya_lora_from_s3_and_writes_to_s3(
    tiny_model_dir: Path, lora_dir: Path, s3_bucket: str
) -> None:
    lora_uri = f"{s3_bucket}/loras/film_style.safetensors"
    store.upload_file(lora_dir / "film_style.safetensors", lora_uri)
    config = GenerateConfig(
        prompts=["red dog <lora:film_style:0.8>"],
        loras={"film_style": lora_uri},
        cfg_scales=[7],
        seeds=[3],
        steps=2,
    )
    out = f"{s3_bucket}/generations/run1"
    report = run(str(tiny_model_dir), out, config)
    assert report["images"] == 1
    assert store.is_complete(out)
    names = set(store.read_manifest(out)["files"])  # under the version the pointer names
    assert {"index.parquet", "report.html", "job.yaml", "sheets/p01_base_64x64.png"} <= names
    assert "images/p01_base_64x64_lora-tagged_cfg7_seed3.png" in names


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("a street at dusk", "a street at dusk, <lora:filmstyle:1>"),
        ("a street, <lora:filmstyle:0.7>", "a street, <lora:filmstyle:0.7>"),
        ("a street, <lora:other:0.5>", "a street, <lora:other:0.5>, <lora:filmstyle:1>"),
    ],
)
def test_review_prompts_always_use_the_lora_just_trained(prompt: str, expected: str) -> None:
    assert with_lora_tag(prompt, "filmstyle") == expected


def test_the_grid_loads_the_kohya_file_select_wrote(tmp_path: Path) -> None:
    lora = selected_lora_folder(tmp_path / "lora")
    assert chosen_lora(str(lora)) == ("filmstyle", str(lora / "filmstyle.safetensors"))


def test_a_trained_lora_joins_the_job_and_every_prompt(tmp_path: Path) -> None:
    lora = selected_lora_folder(tmp_path / "lora")
    config = with_trained_lora(
        GenerateConfig(prompts=["a street", "a car, <lora:filmstyle:0.5>"], trained_lora=str(lora))
    )
    assert config.prompts == ["a street, <lora:filmstyle:1>", "a car, <lora:filmstyle:0.5>"]
    assert config.loras == {"filmstyle": str(lora / "filmstyle.safetensors")}


def test_a_folder_that_select_did_not_write_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no report.json; give the output of lorapipe select"):
        chosen_lora(str(tmp_path))


def test_checkpoints_on_the_grid_compare_the_lora_at_each_step_of_training(
    tiny_model_dir: Path, lora_dir: Path, tmp_path: Path
) -> None:
    """WebUI's X/Y/Z "checkpoint" axis: each image runs with one checkpoint in place of the
    LoRA the prompts use, and the sheet puts the checkpoints across."""
    from lora_fixtures import add_random_lora, randomize_lora, save_lora

    from lorapipe.models import load_base_model

    later = load_base_model(str(tiny_model_dir))
    add_random_lora(later)
    randomize_lora(later, seed=7)
    checkpoints = [lora_dir, save_lora(later, tmp_path / "train" / "checkpoint-300").parent]
    config = GenerateConfig(
        prompts=["a red dog, <lora:film:1>"],
        loras={"film": str(lora_dir)},
        checkpoints=[str(path) for path in checkpoints],
        grid_x="checkpoint",
        steps=[2],
    )
    report = run(str(tiny_model_dir), str(tmp_path / "grid"), config)

    rows = pq.read_table(tmp_path / "grid" / "index.parquet").to_pylist()
    assert [row["loras"][0]["name"] for row in rows] == [
        f"film@{lora_dir.name}",
        "film@checkpoint-300",
    ]
    pixels = {}
    for row in rows:
        with Image.open(tmp_path / "grid" / row["file"]) as image:
            pixels[row["loras"][0]["name"]] = np.asarray(image)
    assert not np.array_equal(*pixels.values())
    # a checkpoint of the prompts' LoRA is applied in its place, not "loaded but unused"
    assert "check_lora_tags" not in {lint["rule"] for lint in report["lints"]}
    # the first checkpoint is the LoRA itself: its image is the one a job without the axis gets
    alone = GenerateConfig(prompts=config.prompts, loras=config.loras, steps=[2])
    run(str(tiny_model_dir), str(tmp_path / "alone"), alone)
    (path,) = (tmp_path / "alone" / "images").glob("*.png")
    with Image.open(path) as image:
        assert np.array_equal(np.asarray(image), pixels[f"film@{lora_dir.name}"])
    (sheet,) = report["sheet_pages"]
    assert sheet["file"] == "sheets/p01_base_64x64.png"
    # the metrics compare the checkpoints, each a row of the table
    assert [row["checkpoint"] for row in report["metrics"]] == [lora_dir.name, "checkpoint-300"]
    assert "<th>checkpoint</th>" in (tmp_path / "grid" / "report.html").read_text()


def test_comparing_checkpoints_needs_the_prompts_to_use_one_lora(tmp_path: Path) -> None:
    from lorapipe.stages.generate import with_checkpoints

    config = GenerateConfig(prompts=["a street"], checkpoints=[str(tmp_path / "checkpoint-1")])
    with pytest.raises(ConfigError, match="but they use none; tag exactly one LoRA"):
        with_checkpoints(config)
