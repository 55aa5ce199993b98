import numpy as np
import pytest

from bench.shapes import world


def test_scene_is_a_function_of_its_seed():
    a = world.scenes("eval", 10, 20)
    b = world.scenes("eval", 10, 20)
    assert a == b
    assert world.sample_scene(5) != world.sample_scene(6) or world.sample_scene(5).seed != 6


def test_render_is_deterministic_and_variant_changes_nuisance_only():
    s = world.sample_scene(world.scene_seed("val", 3))
    r0, r0b, r1 = world.render_scene(s), world.render_scene(s), world.render_scene(s, variant=1)
    assert r0.shape == (world.RESOLUTION, world.RESOLUTION, 3) and r0.dtype == np.float32
    assert np.array_equal(r0, r0b)
    assert not np.array_equal(r0, r1)
    assert r0.min() >= 0 and r0.max() <= 1


def test_splits_are_disjoint():
    ranges = sorted((o, o + world.SPLIT_SIZE) for o in world.SPLIT_OFFSET.values())
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:]))
    with pytest.raises(ValueError):
        world.scene_seed("eval", world.SPLIT_SIZE)


def test_vocabulary_is_rich_enough():
    assert len(world.SHAPES) >= 4 and len(world.COLORS) >= 6 and len(world.SIZES) >= 2
    assert len(world.POSITIONS) >= 5


def test_two_object_fraction_and_distinct_positions():
    sc = world.scenes("eval", 0, 2000)
    two = [s for s in sc if len(s.objects) == 2]
    assert len(two) / len(sc) >= 0.4
    assert all(len({o.position for o in s.objects}) == len(s.objects) for s in sc)


def test_caption_roundtrip():
    for s in world.scenes("train", 0, 300):
        assert world.parse_caption(s.caption) == s.objects
    assert world.parse_caption("a photo of a cat") is None
    assert world.parse_caption("a large red circle at the top left and a small red circle at the top left") is None


def test_objects_are_visible_where_the_caption_says():
    # the object's colour dominates its slot and not the opposite corner
    s = world.Scene((world.Obj("square", "red", "large", "top left"),), seed=7)
    img = world.render_scene(s)
    tl, br = img[2:6, 2:6].mean((0, 1)), img[10:14, 10:14].mean((0, 1))
    assert tl[0] > 0.7 and tl[0] - tl[2] > 0.5
    assert br[0] < 0.5
