"""Users' own data: LLaVA conversation records, parsed, checked and loaded lazily."""
from __future__ import annotations

import itertools
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from edgeqtl import data
from edgeqtl.data import DataError, Record, RecordLoader


def save_image(path, size=(8, 8), color=(255, 0, 0), mode="RGB", **save_args):
    Image.new(mode, size, color).save(path, **save_args)
    return path


def llava(id="r1", image="a.png", question="What colour is it?", answer="red", **extra):
    """A well-formed LLaVA record as a dict; answer=None leaves the assistant turn out."""
    turns = [{"from": "human", "value": f"<image>\n{question}"}]
    if answer is not None:
        turns.append({"from": "gpt", "value": answer})
    return {"id": id, "image": image, "conversations": turns, **extra}


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def folder(tmp_path):
    """A data folder holding a.png, the image the records point at by default."""
    save_image(tmp_path / "a.png")
    return tmp_path


def fault_of(folder, record, **check_args):
    """The one fault line check_records reports for a file holding just `record`."""
    records = data.load_records(write_jsonl(folder / "data.jsonl", [record, llava(id="fine")]))
    report = data.check_records(records, skip_bad=True, **check_args)
    assert len(report.faults) == 1 and [r.id for r in report.records] == ["fine"]
    return report.faults[0]


# --------------------------------------------------------------------------- parsing


def test_json_list_and_json_lines_are_told_apart_by_content(folder):
    records = [llava(id="r1"), llava(id="r2", answer="blue", category="colour")]
    data.write_records(folder / "list.jsonl", records)  # a JSON list, whatever the name says
    data.write_records(folder / "lines.json", records, jsonl=True)
    assert (folder / "list.jsonl").read_text().startswith("[")
    as_list, as_lines = data.load_records(folder / "list.jsonl"), data.load_records(folder / "lines.json")
    for got in (as_list, as_lines):
        assert [r.id for r in got] == ["r1", "r2"]
        assert [r.answers for r in got] == [["red"], ["blue"]]
        assert [r.category for r in got] == [None, "colour"]
        assert got[0].prompt == "What colour is it?"
        assert got[0].turns == [data.Turn("user", "<image>\nWhat colour is it?"), data.Turn("assistant", "red")]
    assert [r.source for r in as_lines] == ["lines.json:1", "lines.json:2"]


def test_records_of_a_json_list_know_their_line(folder):
    (folder / "data.json").write_text(json.dumps([llava(id="r1"), {k: v for k, v in llava().items() if k != "id"}],
                                                 indent=2))
    first, second = data.load_records(folder / "data.json")
    lines = (folder / "data.json").read_text().splitlines()
    for r in (first, second):
        assert lines[int(r.source.split(":")[1]) - 1].strip() == "{"
    assert first.source == "data.json:2"
    assert second.id == "data.json[1]"  # no id: the file and the index in the list


def test_json_lines_split_only_at_newlines(folder):
    path = folder / "data.jsonl"
    path.write_bytes((json.dumps(llava(answer="one\u2028two"), ensure_ascii=False) + "\r\n").encode() * 2)
    assert [r.answers for r in data.load_records(path)] == [["one\u2028two"]] * 2


def test_ids_are_strings_and_default_to_file_and_line(folder):
    records = [llava(id=17), {k: v for k, v in llava().items() if k != "id"}, llava(id=None)]
    got = data.load_records(write_jsonl(folder / "data.jsonl", records))
    assert [r.id for r in got] == ["17", "data.jsonl:2", "data.jsonl:3"]


def test_both_role_spellings_and_several_turns(folder):
    openai = {"id": "o", "image": "a.png", "messages": [
        {"role": "user", "content": "Describe <image> briefly."},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": "And its size?"},
        {"role": "assistant", "content": "Small."}]}
    llava_spelling = llava(id="l")
    llava_spelling["conversations"][0]["from"] = "user"
    llava_spelling["conversations"][1]["from"] = "gpt"
    o, l = data.load_records(write_jsonl(folder / "data.jsonl", [openai, llava_spelling]))
    assert [t.role for t in o.turns] == ["user", "assistant", "user", "assistant"]
    assert o.prompt == "Describe  briefly."
    assert o.answers == ["A red square.", "Small."]
    assert [t.role for t in l.turns] == ["user", "assistant"]


def test_a_record_without_an_answer_is_allowed(folder):
    (r,) = data.load_records(write_jsonl(folder / "data.jsonl", [llava(answer=None)]))
    assert not r.has_answer and r.answers == []
    assert data.check_records([r]).records == [r]


def test_image_paths_resolve_against_the_file_or_image_root(folder, tmp_path_factory):
    elsewhere = tmp_path_factory.mktemp("images")
    absolute = save_image(elsewhere / "abs.png")
    (folder / "sub").mkdir()
    records = [llava(id="rel", image="sub/x.png"), llava(id="abs", image=str(absolute)),
               llava(id="one", image=["a.png"])]
    path = write_jsonl(folder / "data.jsonl", records)
    rel, abs_, one = data.load_records(path)
    assert rel.image == folder / "sub" / "x.png"
    assert abs_.image == absolute
    assert one.image == folder / "a.png"
    rooted = data.load_records(path, image_root=elsewhere)
    assert rooted[0].image == elsewhere / "sub" / "x.png"
    assert rooted[1].image == absolute  # absolute paths ignore image_root


# --------------------------------------------------------------------------- bad records


def drop_marker(r):
    r["conversations"][0]["value"] = "What colour is it?"


def two_markers(r):
    r["conversations"][0]["value"] = "<image> <image> What?"


def marker_later(r):
    r["conversations"][0]["value"] = "What?"
    r["conversations"] += [{"from": "human", "value": "<image> and now?"}]


def assistant_first(r):
    r["conversations"].reverse()


def not_alternating(r):
    r["conversations"].append({"from": "gpt", "value": "again"})


def set_key(key, value):
    return lambda r: r.__setitem__(key, value)


def set_turn(index, turn):
    return lambda r: r["conversations"].__setitem__(index, turn)


BAD_RECORDS = {
    "no marker": (drop_marker, "no <image> marker; put '<image>\\n' in the first user turn where the image goes"),
    "two markers": (two_markers, "2 <image> markers; exactly one is allowed, in the first user turn"),
    "marker not first": (marker_later, "the <image> marker is in turn 3; move it to the first user turn"),
    "empty conversation": (set_key("conversations", []), "empty conversation; give at least the user's turn"),
    "no conversations": (set_key("conversations", None), "no 'conversations' list of"),
    "turn without value": (set_turn(1, {"from": "gpt"}), "turn 2 has no 'from' and 'value' (or 'role' and 'content')"),
    "turn not an object": (set_turn(1, "red"), "turn 2 is a string, not an object with 'from' and 'value'"),
    "text not a string": (set_turn(1, {"from": "gpt", "value": 3}), "turn 2's text is a number, not a string"),
    "unknown role": (set_turn(1, {"from": "system", "value": "x"}),
                     "turn 2 has unknown role 'system'; expected human/user or gpt/assistant"),
    "assistant first": (assistant_first, "conversation starts with an assistant turn; it must start with the user"),
    "not alternating": (not_alternating, "turns 2 and 3 are both assistant turns; turns must alternate"),
    "several images": (set_key("image", ["a.png", "b.png"]), "2 images; multi-image records are not supported"),
    "text only": (set_key("image", None), "no 'image'; text-only records are not supported"),
    "bad id": (set_key("id", [1]), "'id' must be a string or a number (got a list)"),
}


@pytest.mark.parametrize("case", BAD_RECORDS)
def test_each_bad_record_is_one_line_naming_id_and_fault(folder, case):
    spoil, fault = BAD_RECORDS[case]
    record = llava(id="bad-7")
    spoil(record)
    expected_id = "data.jsonl:1" if case == "bad id" else "bad-7"
    line = fault_of(folder, record)
    assert line.startswith(f"record {expected_id} (data.jsonl:1): {fault}")
    assert "\n" not in line


def test_a_record_that_is_not_an_object(folder):
    path = folder / "data.jsonl"
    path.write_text(json.dumps(llava(id="fine")) + "\n[1, 2]\n")
    report = data.check_records(data.load_records(path), skip_bad=True)
    assert report.faults == ['record data.jsonl:2 (data.jsonl:2): not a JSON object (got a list); '
                             'a record is {"id", "image", "conversations"}']


def test_missing_image(folder):
    line = fault_of(folder, llava(id="m", image="gone.png"))
    assert line == f"record m (data.jsonl:1): image not found: {folder / 'gone.png'}"


def test_unreadable_images(folder):
    (folder / "garbage.png").write_bytes(b"this is not a png at all" * 10)
    line = fault_of(folder, llava(id="g", image="garbage.png"))
    assert line.startswith(f"record g (data.jsonl:1): cannot read image {folder / 'garbage.png'}: ")
    save_image(folder / "whole.jpg", size=(64, 64))
    (folder / "cut.jpg").write_bytes((folder / "whole.jpg").read_bytes()[:300])  # truncated download
    assert fault_of(folder, llava(id="t", image="cut.jpg")).startswith("record t (data.jsonl:1): cannot read image")


def test_prompt_longer_than_the_context(folder):
    def words(record: Record) -> int:
        return len(record.prompt.split())

    line = fault_of(folder, llava(id="long", question="one two three four five six"), max_prompt_tokens=5,
                    count_tokens=words)
    assert line == ("record long (data.jsonl:1): prompt is 6 tokens, longer than the context of 5; "
                    "shorten it or raise the context length")
    with pytest.raises(ValueError, match="pass both"):
        data.check_records(data.load_records(folder / "data.jsonl"), max_prompt_tokens=5)


def test_several_faults_of_one_record_share_its_line(folder):
    line = fault_of(folder, llava(id="x", image="gone.png", question="a b c d e f"), max_prompt_tokens=5,
                    count_tokens=lambda r: len(r.prompt.split()))
    assert line.startswith("record x (data.jsonl:1): image not found: ")
    assert "; prompt is 6 tokens" in line


def test_without_skip_bad_any_fault_stops_with_the_first_few(folder):
    records = [llava(id=f"bad{i}", image="gone.png") for i in range(7)] + [llava(id="fine")]
    loaded = data.load_records(write_jsonl(folder / "data.jsonl", records))
    with pytest.raises(DataError) as e:
        data.check_records(loaded)
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("7 of 8 records are bad: record bad0 (data.jsonl:1): image not found: ")
    assert "record bad4 (data.jsonl:5)" in message and "bad5" not in message
    assert message.endswith(" | and 2 more; fix them or pass --skip-bad to skip bad records")


def test_skip_bad_returns_the_good_records_and_counts_the_rest(folder):
    records = [llava(id="a"), llava(id="b", image="gone.png"), llava(id="c"), {"id": "d"}, llava(id="e")]
    report = data.check_records(data.load_records(write_jsonl(folder / "data.jsonl", records)), skip_bad=True)
    assert [r.id for r in report.records] == ["a", "c", "e"]
    assert report.skipped == 2
    assert [f.split(":")[0] for f in report.faults] == ["record b (data.jsonl", "record d (data.jsonl"]
    assert report.summary() == "3 of 5 records kept, 2 bad ones skipped"


def test_skip_bad_with_nothing_left_still_stops(folder):
    loaded = data.load_records(write_jsonl(folder / "data.jsonl", [llava(image="gone.png")]))
    with pytest.raises(DataError, match="all 1 records are bad: record r1"):
        data.check_records(loaded, skip_bad=True)


def test_image_checks_keep_their_records_across_rounds_of_threads(folder, monkeypatch):
    monkeypatch.setattr(data, "CHECK_CHUNK", 3)
    records = [llava(id=f"r{i}", image="gone.png" if i in (2, 5) else "a.png") for i in range(8)]
    loaded = data.load_records(write_jsonl(folder / "data.jsonl", records))
    report = data.check_records(loaded, skip_bad=True, workers=2)
    assert [f.split(" (")[0] for f in report.faults] == ["record r2", "record r5"]


def test_check_images_false_does_not_touch_the_files(folder):
    loaded = data.load_records(write_jsonl(folder / "data.jsonl", [llava(image="gone.png")]))
    assert data.check_records(loaded, check_images=False).skipped == 0


# --------------------------------------------------------------------------- broken files


def test_a_broken_json_list_names_the_line(folder):
    text = json.dumps([llava(id="r1"), llava(id="r2")], indent=2).splitlines()
    text[3] = text[3].replace('"image"', "image")  # line 4: a key without quotes
    (folder / "data.json").write_text("\n".join(text))
    with pytest.raises(DataError, match=r"^data\.json:4: not valid JSON \(.*column \d+\); fix the file"):
        data.load_records(folder / "data.json")


def test_a_json_list_missing_a_comma_names_the_line(folder):
    (folder / "data.json").write_text("[\n" + json.dumps(llava()) + "\n" + json.dumps(llava()) + "\n]\n")
    with pytest.raises(DataError, match=r"^data\.json:3: not valid JSON \(Expecting ',' or ']'"):
        data.load_records(folder / "data.json")


def test_a_broken_json_lines_file_names_the_line(folder):
    (folder / "data.jsonl").write_text(json.dumps(llava()) + "\n\n" + '{"id": "r2", "image": \n')
    with pytest.raises(DataError, match=r"^data\.jsonl:3: not valid JSON .*one record per line \(JSON lines\)"):
        data.load_records(folder / "data.jsonl")


def test_a_file_that_is_no_data_file(folder):
    with pytest.raises(DataError, match="data file not found"):
        data.load_records(folder / "nothing.json")
    (folder / "empty.jsonl").write_text("\n \n")
    with pytest.raises(DataError, match="no records"):
        data.load_records(folder / "empty.jsonl")
    (folder / "latin1.jsonl").write_bytes(b'{"id": "ok"}\n{"id": "caf\xe9"}\n')
    with pytest.raises(DataError, match=r"^latin1\.jsonl:2: not UTF-8 text"):
        data.load_records(folder / "latin1.jsonl")


# --------------------------------------------------------------------------- loading


def many_records(folder, n):
    """n good records, all showing a.png (the loader cannot tell)."""
    records = data.load_records(write_jsonl(folder / "data.jsonl", [llava(id=f"r{i}") for i in range(n)]))
    return data.check_records(records, check_images=False).records


def ids(batch):
    return [r.id for r in batch]


def test_each_epoch_is_the_seeds_permutation(folder):
    records = many_records(folder, 10)
    loader = RecordLoader(records, batch_size=4, seed=3)
    stream = [r for step in range(10) for r in loader.batch_records(step)]  # 40 items: epochs 0..3
    for epoch in range(4):
        order = np.random.default_rng([3, epoch]).permutation(10)
        assert ids(stream[epoch * 10:(epoch + 1) * 10]) == [f"r{i}" for i in order]
    assert ids(RecordLoader(records, 4, seed=3).batch_records(7)) == ids(loader.batch_records(7))
    assert ids(RecordLoader(records, 4, seed=4).batch_records(0)) != ids(loader.batch_records(0))


def test_a_resumed_stream_sees_the_batches_it_would_have_seen(folder):
    records = many_records(folder, 9)
    whole = [ids(r for r, _ in b) for b in itertools.islice(RecordLoader(records, 4, seed=1).stream(), 8)]
    resumed = [ids(r for r, _ in b) for b in itertools.islice(RecordLoader(records, 4, seed=1).stream(start=5), 3)]
    assert resumed == whole[5:8]
    assert ids(r for r, _ in RecordLoader(records, 4, seed=1).batch(6)) == whole[6]


def test_a_batch_larger_than_the_file_wraps_into_the_next_epoch(folder):
    records = many_records(folder, 3)
    batch = RecordLoader(records, batch_size=7).batch_records(0)
    assert len(batch) == 7 and set(ids(batch)) == {"r0", "r1", "r2"}


def test_images_are_decoded_lazily_with_a_bounded_prefetch(folder, monkeypatch):
    records = many_records(folder, 1000)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda *a, **k: opened.append(a[0]) or real_open(*a, **k))
    loader = RecordLoader(records, batch_size=4, prefetch=2, workers=2)
    assert opened == []
    stream = loader.stream()
    first = next(stream)
    assert len(first) == 4 and all(im.mode == "RGB" for _, im in first)
    assert len(opened) <= 4 * 3  # this batch and the two being prefetched
    stream.close()


def test_in_order_is_one_pass_in_file_order(folder):
    records = many_records(folder, 5)
    batches = list(RecordLoader(records, batch_size=2, arrays=True).in_order())
    assert [ids(r for r, _ in b) for b in batches] == [["r0", "r1"], ["r2", "r3"], ["r4"]]
    image = batches[0][0][1]
    assert isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.shape == (8, 8, 3)


def test_an_image_broken_after_the_check_names_the_record(folder):
    records = data.check_records(data.load_records(write_jsonl(folder / "data.jsonl", [llava(id="late")]))).records
    (folder / "a.png").write_bytes(b"overwritten")
    with pytest.raises(DataError, match=r"^record late \(data\.jsonl:1\): cannot read image .*rerun with --skip-bad"):
        RecordLoader(records, batch_size=1).batch(0)


def test_the_loader_refuses_unchecked_bad_records(folder):
    loaded = data.load_records(write_jsonl(folder / "data.jsonl", [{"id": "nope"}]))
    with pytest.raises(DataError, match="record nope .*pass the records through check_records first"):
        RecordLoader(loaded, batch_size=1)


# --------------------------------------------------------------------------- images


def rgba(path):
    im = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # transparent, composited on white
    im.putpixel((0, 0), (255, 0, 0, 255))
    im.save(path)


def palette_with_transparency(path):
    im = Image.new("P", (4, 4), 1)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.putpixel((1, 1), 0)
    im.save(path, transparency=0)  # index 0 is transparent: white, index 1 red


def sixteen_bit_grey(path):
    Image.fromarray(np.full((4, 4), 65535 // 2, dtype=np.uint16)).save(path)


IMAGES = {
    "rgba.png": (rgba, {(0, 0): (255, 0, 0), (2, 2): (255, 255, 255)}),
    "grey.png": (lambda p: save_image(p, (4, 4), 100, "L"), {(1, 1): (100, 100, 100)}),
    "palette.png": (palette_with_transparency, {(0, 0): (255, 0, 0), (1, 1): (255, 255, 255)}),
    "grey16.png": (sixteen_bit_grey, {(0, 0): (127, 127, 127)}),
    "cmyk.jpg": (lambda p: save_image(p, (8, 8), (0, 255, 255, 0), "CMYK", quality=95), {(4, 4): (255, 0, 0)}),
    "bilevel.png": (lambda p: save_image(p, (4, 4), 1, "1"), {(0, 0): (255, 255, 255)}),
    "tall.png": (lambda p: save_image(p, (1, 37), (0, 0, 255)), {(0, 36): (0, 0, 255)}),
}


@pytest.mark.parametrize("name", IMAGES)
def test_any_image_mode_comes_out_rgb(tmp_path, name):
    make, pixels = IMAGES[name]
    make(tmp_path / name)
    im = data.open_rgb(tmp_path / name)
    assert im.mode == "RGB"
    for xy, rgb in pixels.items():
        assert np.abs(np.subtract(im.getpixel(xy), rgb)).max() <= 3, (xy, im.getpixel(xy))


def test_exif_rotated_photos_come_out_upright(tmp_path):
    stored = Image.new("RGB", (32, 16), (255, 0, 0))
    stored.paste((0, 0, 255), (16, 0, 32, 16))  # as stored: red left, blue right
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    stored.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    im = data.open_rgb(tmp_path / "phone.jpg")
    assert im.size == (16, 32)
    top, bottom = im.getpixel((8, 4)), im.getpixel((8, 28))
    assert top[0] > 200 > top[2] and bottom[2] > 200 > bottom[0]  # red on top, blue below


def test_decode_size_shrinks_big_jpegs_but_not_below_it(tmp_path):
    save_image(tmp_path / "big.jpg", size=(640, 480))
    assert data.open_rgb(tmp_path / "big.jpg", decode_size=100).size == (160, 120)


# --------------------------------------------------------------------------- shards


def categorised(folder, n=60):
    rows = [llava(id=f"r{i}", category=["cat", "dog", "bird"][i % 3]) for i in range(n)]
    return data.load_records(write_jsonl(folder / "data.jsonl", rows))


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_shards_are_disjoint_cover_the_file_and_are_deterministic(folder, alpha):
    records = categorised(folder)
    parts = [data.shard(records, i, 4, seed=5, alpha=alpha) for i in range(4)]
    every_id = [r.id for part in parts for r in part]
    assert sorted(every_id) == sorted(r.id for r in records) and len(set(every_id)) == len(records)
    assert all(part for part in parts)
    assert [r.id for r in data.shard(records, 2, 4, seed=5, alpha=alpha)] == [r.id for r in parts[2]]
    assert [r.id for r in data.shard(records, 2, 4, seed=6, alpha=alpha)] != [r.id for r in parts[2]]
    if alpha is None:
        assert sorted(len(p) for p in parts) == [15, 15, 15, 15]


def test_a_small_alpha_skews_the_categories(folder):
    records = categorised(folder, 300)
    part = data.shard(records, 0, 3, seed=0, alpha=0.05)
    shares = np.bincount([["cat", "dog", "bird"].index(r.category) for r in part], minlength=3) / len(part)
    assert shares.max() > 0.6  # IID would give about 1/3 each


def test_shard_arguments_are_checked(folder):
    records = many_records(folder, 3)
    with pytest.raises(ValueError, match="outside 0..1"):
        data.shard(records, 2, 2)
    with pytest.raises(ValueError, match="cannot be split among 4 devices"):
        data.shard(records, 0, 4)
    with pytest.raises(ValueError, match="needs a 'category'"):
        data.shard(records, 0, 2, alpha=1.0)


# --------------------------------------------------------------------------- answers and writing


@pytest.mark.parametrize("text, normal", [
    ("The Cat.", "cat"),
    ("  a   RED\tball ", "red ball"),
    ("An apple, the pear!", "apple pear"),
    ("state-of-the-art", "stateoftheart"),  # SQuAD deletes punctuation
    ("theatre", "theatre"),  # articles only as whole words
    ("¿Dónde?", "dónde"),
    ("", ""),
])
def test_normalize_answer(text, normal):
    assert data.normalize_answer(text) == normal


def test_exact_match():
    assert data.exact_match("The red one.", ["blue", "red one"])
    assert data.exact_match("Two", "two")
    assert not data.exact_match("two cats", ["two"])


def test_written_records_read_back(folder):
    original = data.load_records(write_jsonl(folder / "in.jsonl", [llava(id="ü", answer="très"), llava(id="2")]))
    for jsonl in (False, True):
        path = data.write_records(folder / "out" / "data.json", original, jsonl=jsonl)
        back = data.load_records(path)
        assert [(r.id, r.image, r.turns) for r in back] == [(r.id, r.image, r.turns) for r in original]
        assert back[1].source == "data.json:2" if jsonl else back[1].source == "data.json:3"
    assert not list((folder / "out").glob("*.partial"))


def test_the_module_does_not_import_torch():
    code = "import sys, edgeqtl.data; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
