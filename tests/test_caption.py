"""CLIP captioning, end to end on a tiny open_clip model trained here (offline, seconds) to tell red squares
from blue circles: a random model gets all held-out images right with probability 1/2^8."""

import hashlib
import os
import random
import shutil
from pathlib import Path

import pytest
from PIL import Image

from lora_trainer import cli
from lora_trainer.caption import Captioner, Choice, caption_folder
from lora_trainer.caption_editing import BACKUP_DIR, load_captions
from lora_trainer.clip_models import load_clip
from lora_trainer.dataset import scan_dataset
from lora_trainer.errors import ModelError
from lora_trainer.phrase_banks import BankError, PhraseBank, available_banks, load_banks, read_bank
from lora_trainer.tiny_clip import KINDS, TINY_CLIP, register_tiny_clip, shape_image, train_tiny_clip

RED, BLUE = KINDS["red square"], KINDS["blue circle"]


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models only wait on a second thread, and far longer when other jobs share the CPU."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The trained tiny model on disk: its config .json, a .pt state dict and a .safetensors copy."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("tiny_clip")
    config = register_tiny_clip(root)
    model, _ = train_tiny_clip(steps=30, seed=0)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, root / "tiny.pt")
    save_file(state, str(root / "tiny.safetensors"))
    return {"config": config, "pt": root / "tiny.pt", "safetensors": root / "tiny.safetensors"}


@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    path = tmp_path_factory.mktemp("phrases") / "candidates.txt"
    path.write_text(f"{RED}\n{BLUE}\n", encoding="utf-8")
    return path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = tmp_path / "cache"
    monkeypatch.setenv("LORA_TRAINER_CACHE", str(folder))
    return folder


@pytest.fixture(scope="module")
def captioner(tiny, tmp_path_factory):
    """One loaded model with one embedding cache, shared by the tests that do not test loading or caching."""
    return Captioner(load_clip(str(tiny["config"]), str(tiny["pt"])), tmp_path_factory.mktemp("cache"))


def shapes_dir(root: Path, per_kind: int = 4, seed: int = 123) -> dict:
    """Held-out pictures (a seed training never used): {file name: the phrase it should get}."""
    rng, truth = random.Random(seed), {}
    root.mkdir(parents=True, exist_ok=True)
    for i in range(per_kind):
        for kind, phrase in KINDS.items():
            name = f"{kind.replace(' ', '_')}_{i}.png"
            shape_image(kind, rng).save(root / name)
            truth[name] = phrase
    return truth


def scanned(root: Path) -> dict:
    scan = scan_dataset(str(root))
    return {r.path.relative_to(scan.root).as_posix(): r.caption for r in scan.records}


def snapshot(root: Path) -> dict:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in root.rglob("*") if p.is_file()}


# -- the captioner works ---------------------------------------------------------------------------

def test_tiny_clip_captions_held_out_images_through_the_cli(tmp_path, tiny, candidates, cache, capsys):
    data = tmp_path / "data"
    truth = shapes_dir(data)
    rc = cli.main(["caption", str(data), "--model", str(tiny["config"]), "--pretrained", str(tiny["pt"]),
                   "--candidates", str(candidates), "--banks", "none"])
    assert rc == 0
    captions = scanned(data)  # read back the way training reads it
    assert set(captions) == set(truth)
    for name, phrase in truth.items():
        other = BLUE if phrase == RED else RED
        assert captions[name] == phrase, (name, captions[name])
        assert other not in captions[name]
    assert (data / "metadata.csv").is_file() and not list(data.glob("*.txt"))
    assert "captioned 8 image(s)" in capsys.readouterr().out


def test_safetensors_weights_and_bundled_banks(tmp_path, tiny, candidates, cache):
    data = tmp_path / "data"
    truth = shapes_dir(data, per_kind=2)
    captioner = Captioner.load(str(tiny["config"]), str(tiny["safetensors"]))
    run = caption_folder(data, captioner, candidates=candidates)  # every bundled bank + the candidates
    for name, phrase in truth.items():
        tags = [t.strip() for t in run.captions[name].split(",")]
        assert tags[0] == phrase  # the user's candidates come first
        assert (BLUE if phrase == RED else RED) not in tags
        assert captioner.count_tokens(run.captions[name]) <= 75


@pytest.mark.parametrize("fmt", ["csv", "txt"])
def test_captions_feed_training_unchanged(tmp_path, captioner, candidates, fmt):
    data = tmp_path / "data"
    shapes_dir(data, per_kind=2)
    shutil.copytree(data, data / "5_sub")  # a kohya repeats folder too
    run = caption_folder(data, captioner, candidates=candidates, fmt=fmt, trigger="brandx")
    assert len(run.captions) == 8
    assert scanned(data) == run.captions
    assert all(c.startswith("brandx, ") for c in run.captions.values())
    assert (data / "metadata.csv").is_file() == (fmt == "csv")


# -- modes, trigger, candidates ----------------------------------------------------------------------

def test_skip_append_overwrite(tmp_path, captioner, candidates):
    data = tmp_path / "data"
    truth = shapes_dir(data, per_kind=1)
    red = next(n for n, p in truth.items() if p == RED)
    blue = next(n for n, p in truth.items() if p == BLUE)
    (data / "metadata.csv").write_text(f"filename,prompt\n{red},hand written\n", encoding="utf-8")
    options = {"banks": [], "candidates": candidates}

    run = caption_folder(data, captioner, **options)  # skip is the default
    assert run.kept == [red] and list(run.captions) == [blue]
    assert scanned(data) == {red: "hand written", blue: BLUE}

    run = caption_folder(data, captioner, mode="append", trigger="brandx", **options)
    assert scanned(data) == {red: f"brandx, hand written, {RED}", blue: f"brandx, {BLUE}"}
    caption_folder(data, captioner, mode="append", trigger="brandx", **options)  # appending again adds nothing
    assert scanned(data) == {red: f"brandx, hand written, {RED}", blue: f"brandx, {BLUE}"}

    run = caption_folder(data, captioner, mode="overwrite", **options)
    assert scanned(data) == {red: RED, blue: BLUE}
    assert run.saved.backup_dir is not None and (run.saved.backup_dir / "metadata.csv").is_file()


def test_trigger_moves_first_and_candidates_header(tmp_path, captioner):
    data = tmp_path / "data"
    truth = shapes_dir(data, per_kind=1)
    (data / "metadata.csv").write_text("filename,prompt\n" + "".join(f"{n},old, brandx\n" for n in truth),
                                       encoding="utf-8")
    phrases = tmp_path / "mine.txt"
    phrases.write_text(f"# top: 1\n{RED}\n{BLUE}\n", encoding="utf-8")  # one phrase each, though both pass -1.0
    caption_folder(data, captioner, banks=[], candidates=phrases, mode="append", trigger="brandx", threshold=-1.0)
    assert scanned(data) == {n: f"brandx, old, {p}" for n, p in truth.items()}


def test_token_limit(tmp_path, captioner):
    data = tmp_path / "data"
    shapes_dir(data, per_kind=1)
    phrases = tmp_path / "long.txt"
    phrases.write_text("# top: 60\n" + "".join(f"a very long descriptive phrase number {i}\n" for i in range(60)),
                       encoding="utf-8")
    run = caption_folder(data, captioner, banks=[], candidates=phrases, threshold=-1.0, trigger="brandx")
    for caption in run.captions.values():
        assert 60 < captioner.count_tokens(caption) <= 75
        assert caption.startswith("brandx, a very long")


def test_compose_deduplicates(captioner):
    choices = [Choice("c", RED, 0.9), Choice("colour", "Red", 0.5), Choice("subject", "a  red square", 0.4),
               Choice("subject", "a square", 0.3)]
    assert captioner.compose(choices, trigger="brandx", existing="brandx, kept tag") == \
        f"brandx, kept tag, {RED}, a square"


def test_editor_set_progress_and_stop(tmp_path, captioner, candidates):
    data = tmp_path / "data"
    truth = shapes_dir(data, per_kind=2)
    captions = load_captions(data)  # what the tab holds, with an unsaved edit
    first = sorted(truth)[0]
    captions.set_caption(first, "edited by hand")
    seen = []
    run = caption_folder(captions, captioner, banks=[], candidates=candidates, batch_size=2,
                         on_progress=lambda done, total: seen.append((done, total)), should_stop=lambda: True)
    assert run.stopped and seen == [(2, 3)] and run.kept == [first]
    assert "stopped early" in run.summary()
    got = scanned(data)
    assert got[first] == "edited by hand"
    assert sorted(got.values()).count("") == 1  # the batch never started keeps no caption
    assert all(got[n] == truth[n] for n in run.captions)


# -- odd inputs ---------------------------------------------------------------------------------------

def test_unreadable_images_are_listed_and_skipped(tmp_path, captioner, candidates):
    data = tmp_path / "data"
    truth = shapes_dir(data, per_kind=1)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (data / "empty.jpg").write_bytes(b"")
    run = caption_folder(data, captioner, banks=[], candidates=candidates)
    assert sorted(p.name for p, _ in run.unreadable) == ["broken.png", "empty.jpg"]
    assert all("cannot be read as an image" in reason for _, reason in run.unreadable)
    assert set(run.captions) == set(truth)
    assert "2 unreadable, skipped: " in run.summary()
    assert "broken.png" not in (data / "metadata.csv").read_text(encoding="utf-8")


def test_odd_file_names(tmp_path, captioner, candidates):
    data = tmp_path / "data"
    rng = random.Random(5)
    names = {"a, b.png": RED, 'say "hi".png': BLUE, "café 日本.png": RED, "10_x/o'neil; 1.png": BLUE}
    for name, phrase in names.items():
        (data / name).parent.mkdir(parents=True, exist_ok=True)
        shape_image("red square" if phrase == RED else "blue circle", rng).save(data / name)
    caption_folder(data, captioner, banks=[], candidates=candidates)
    assert scanned(data) == names


def test_same_inputs_same_captions(tmp_path, captioner, candidates):
    first, second = tmp_path / "one", tmp_path / "two"
    shapes_dir(first, per_kind=3)
    shutil.copytree(first, second)
    a = caption_folder(first, captioner, candidates=candidates, batch_size=16)
    fresh = Captioner(captioner.clip, captioner.cache.folder.parent.parent)  # bank embeddings from the disk cache
    b = caption_folder(second, fresh, candidates=candidates, batch_size=1)
    assert a.captions == b.captions
    assert (first / "metadata.csv").read_bytes() == (second / "metadata.csv").read_bytes()


def test_bank_embeddings_are_cached_per_model(tmp_path, tiny, candidates, cache):
    data = tmp_path / "data"
    shapes_dir(data, per_kind=1)

    def counted(captioner):
        calls = []
        original = captioner.clip.model.encode_text
        captioner.clip.model.encode_text = lambda tokens: calls.append(len(tokens)) or original(tokens)
        return calls

    first = Captioner.load(str(tiny["config"]), str(tiny["pt"]))
    calls = counted(first)
    caption_folder(data, first, candidates=candidates)
    phrases = sum(len(b.phrases) for b in load_banks()) + 2
    assert sum(calls) == phrases  # every phrase encoded once
    files = sorted(p.name for p in cache.rglob("*.npy"))
    assert len(files) == len(available_banks()) + 1 and "candidates-" in " ".join(files)

    second = Captioner.load(str(tiny["config"]), str(tiny["pt"]))  # a new run: model loaded again
    calls = counted(second)
    run = caption_folder(data, second, candidates=candidates, mode="overwrite")
    assert calls == []  # nothing re-encoded
    assert run.saved.written == []  # and the same captions

    copy = tmp_path / "other.pt"  # other weights (another file): another cache entry
    shutil.copy(tiny["pt"], copy)
    third = Captioner.load(str(tiny["config"]), str(copy))
    calls = counted(third)
    third.text_embeddings(read_bank(candidates))
    assert calls == [2]


def test_dataset_folder_untouched_except_caption_files(tmp_path, captioner, candidates):
    data = tmp_path / "data"
    truth = shapes_dir(data, per_kind=2)
    (data / "notes.md").write_text("mine", encoding="utf-8")
    first = next(iter(truth))
    (data / Path(first).with_suffix(".txt")).write_text("old caption", encoding="utf-8")
    before = snapshot(data)
    caption_folder(data, captioner, candidates=candidates, fmt="both", mode="overwrite")
    after = snapshot(data)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    allowed = {"metadata.csv"} | {Path(n).with_suffix(".txt").as_posix() for n in truth}
    assert changed - allowed == {p for p in after if p.startswith(BACKUP_DIR + "/")}
    assert all(after[n] == before[n] for n in list(truth) + ["notes.md"])
    assert not any(name.startswith(".tmp-") for name in os.listdir(data))


# -- model choice and its errors -------------------------------------------------------------------

def test_offline_tag_names_the_file_to_provide(tmp_path, monkeypatch, capsys):
    from lora_trainer import clip_models

    monkeypatch.setattr(clip_models, "_cached_weights", lambda cfg: None)  # as on a machine that never downloaded
    monkeypatch.setattr(clip_models, "_online", lambda cfg: False)
    with pytest.raises(ModelError) as err:
        load_clip("ViT-L-14", "openai")
    message = str(err.value)
    assert "ViT-L-14 (openai)" in message and "no network" in message
    assert "https://openaipublic.azureedge.net/clip/models/" in message and "ViT-L-14.pt" in message
    assert "--pretrained /path/to/ViT-L-14.pt" in message and "\n" not in message

    data = tmp_path / "data"
    shapes_dir(data, per_kind=1)
    assert cli.main(["caption", str(data), "--model", "ViT-B-32", "--pretrained", "laion2b_s34b_b79k"]) == 2
    err_text = capsys.readouterr().err
    assert err_text.startswith("error: ") and err_text.count("\n") == 1
    assert "ViT-B-32 (laion2b_s34b_b79k)" in err_text and "open_clip_pytorch_model.bin" in err_text
    assert "Traceback" not in err_text
    assert not (data / "metadata.csv").exists()


def test_model_choice_errors(tmp_path, tiny):
    with pytest.raises(ModelError, match="does not exist"):
        load_clip(str(tiny["config"]), str(tmp_path / "missing.safetensors"))
    with pytest.raises(ModelError, match="did you mean .*ViT-L-14"):
        load_clip("ViT-L-15", "openai")
    with pytest.raises(ModelError, match="known tags: .*openai"):
        load_clip("ViT-B-32", "no-such-tag")
    with pytest.raises(ModelError, match="does not fit CLIP ViT-B-32"):
        load_clip("ViT-B-32", str(tiny["pt"]))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not weights")
    with pytest.raises(ModelError, match="cannot be read as CLIP weights"):
        load_clip(str(tiny["config"]), str(garbage))


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning", "ignore::FutureWarning")
def test_openai_style_torchscript_file(tmp_path, tiny):
    """OpenAI ships TorchScript .pt files (what open_clip 2.20 downloads for 'openai'): read them, with QuickGELU."""
    import torch

    source = load_clip(str(tiny["config"]), str(tiny["pt"])).model
    traced = torch.jit.trace_module(source, {"encode_image": torch.zeros(1, 3, 64, 64),
                                             "encode_text": torch.zeros(1, 77, dtype=torch.long)}, check_trace=False)
    traced.save(str(tmp_path / "tiny-jit.pt"))
    model = load_clip(str(tiny["config"]), str(tmp_path / "tiny-jit.pt")).model
    assert type(model.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))


def test_registered_name_and_random_weights(tiny):
    clip = load_clip(TINY_CLIP, "none")  # registered by the fixture; random weights are allowed, not cached
    assert clip.model_id == "" and clip.name == TINY_CLIP
    assert load_clip(TINY_CLIP, str(tiny["pt"])).model_id.startswith(f"{TINY_CLIP}|file-tiny-")


# -- phrase banks --------------------------------------------------------------------------------------

def test_bundled_banks():
    banks = load_banks()
    assert {"subject", "medium", "style", "lighting", "colour", "composition"} <= {b.name for b in banks}
    assert all(30 <= len(b.phrases) <= 500 for b in banks)
    assert [b.order for b in banks] == sorted(b.order for b in banks)
    assert load_banks([]) == []
    with pytest.raises(BankError, match="unknown phrase bank 'colours'"):
        load_banks(["colours"])


def test_bank_file_format(tmp_path):
    path = tmp_path / "mine.txt"
    path.write_text("# a comment\n# top: 4\n#order: 7\n\nRed  thing\nred thing\nblue\n", encoding="utf-8")
    assert read_bank(path) == PhraseBank("mine", ("Red thing", "blue"), 4, 7)
    path.write_text("x\n# top: many\n", encoding="utf-8")
    with pytest.raises(BankError, match="line 2"):
        read_bank(path)
    path.write_text("# only comments\n", encoding="utf-8")
    with pytest.raises(BankError, match="no phrases"):
        read_bank(path)
    extra = tmp_path / "banks"
    extra.mkdir()
    (extra / "colour.txt").write_text("teal\n", encoding="utf-8")
    assert load_banks(["colour"], extra)[0].phrases == ("teal",)


def test_bad_options_are_one_line_errors(tmp_path, captioner):
    data = tmp_path / "data"
    shapes_dir(data, per_kind=1)
    assert Image.open(next(data.iterdir())).size == (64, 64)
    for kwargs, match in [({"mode": "replace"}, "unknown"), ({"threshold": 3.0}, "cosine"),
                          ({"batch_size": 0}, "batch size"), ({"banks": []}, "nothing to caption")]:
        with pytest.raises(Exception, match=match):
            caption_folder(data, captioner, **kwargs)
