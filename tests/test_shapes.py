"""The shapes benchmark: deterministic, balanced, answerable, tokenisable."""
from __future__ import annotations

from collections import Counter

import numpy as np

from edgeqtl import shapes


def test_heldout_is_fixed_and_balanced():
    a, b = shapes.heldout(500), shapes.heldout(500)
    assert len(a) == 500 * len(shapes.FAMILIES)
    assert Counter(s.family for s in a) == {f: 500 for f in shapes.FAMILIES}
    assert all(np.array_equal(x.image, y.image) and x.question == y.question for x, y in zip(a[::97], b[::97]))


def test_training_batches_are_deterministic_and_differ_from_heldout():
    b1, b2 = shapes.train_batch(7, 3, 16), shapes.train_batch(7, 3, 16)
    assert [s.question for s in b1] == [s.question for s in b2]
    assert np.array_equal(b1[0].image, b2[0].image)
    assert not np.array_equal(shapes.train_batch(7, 4, 16)[0].image, b1[0].image)
    held = {s.image.tobytes() for s in shapes.heldout(50)}
    assert not any(s.image.tobytes() in held for s in shapes.train_batch(0, 0, 64))


def test_answers_are_correct_for_the_layout():
    for s in shapes.heldout(40):
        by_shape = {o.shape: o for o in s.objects}
        by_color = {o.color: o for o in s.objects}
        if s.family == "colour":
            assert by_shape[s.question.split()[-2]].color == s.answer
        elif s.family == "shape":
            assert by_color[s.question.split()[-3]].shape == s.answer
        elif s.family == "count":
            assert shapes.COUNT_WORDS[len(s.objects) - 1] == s.answer
        elif s.family == "position":
            o = by_shape[s.question.split()[-2]]
            assert shapes.CORNERS[(o.row, o.col)] == s.answer and o.color == s.question.split()[-3]
        elif s.family == "relation":
            words = s.question.split()
            anchor = by_shape[words[-2]]
            rel = " ".join(words[5:-3])
            dr, dc = shapes.RELATIONS[rel]
            target = [o for o in s.objects if (o.row, o.col) == (anchor.row + dr, anchor.col + dc)]
            assert target and target[0].color == s.answer


def test_every_question_and_answer_tokenises_without_unknowns(tmp_path):
    shapes.save_tokenizer(tmp_path, 16)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    unk = tok.token_to_id(shapes.UNK_TOKEN)
    for s in shapes.heldout(20):
        ids = tok.encode(shapes.format_prompt(s.question, 16) + " " + s.answer).ids
        assert unk not in ids
        assert ids.count(tok.token_to_id(shapes.IMAGE_TOKEN)) == 16
        assert tok.id_to_token(ids[-1]) == s.answer  # answers are single tokens
