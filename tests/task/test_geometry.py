"""Geometry: box conventions, the model grid, IoU, matching and masks (hand-worked values)."""

import numpy as np
import pytest

from mmrad.task.geometry import (
    answer_scale,
    answer_unit,
    as_boxes,
    box_area,
    clip_box,
    defect_cells,
    from_model_grid,
    grid_scale,
    iou,
    iou_matrix,
    is_valid_box,
    mask_to_boxes,
    match_boxes,
    model_grid,
    smart_resize,
    to_answer_boxes,
    to_model_grid,
)

# ------------------------------------------------------------------------ smart resize


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [
        # 32.14 -> 32 patches of 28 each side; 896^2 = 802,816 fits the default budget
        (900, 900, (896, 896)),
        # rounds to 37 * 28 = 1036, too big; beta = 1024 / sqrt(1,003,520) = 1.0222,
        # 1024 / beta / 28 = 35.78 -> floor 35 -> 980
        (1024, 1024, (980, 980)),
        # rounds to 1092 x 1932, too big; beta = sqrt(1920 * 1080 / 1,003,520) = 1.4375;
        # 1080 / beta / 28 = 26.83 -> 26 -> 728, 1920 / beta / 28 = 47.70 -> 47 -> 1316
        (1080, 1920, (728, 1316)),
        # 1.79 -> 2 and 3.57 -> 4 patches: 56 x 112 = 6,272 is above the minimum
        (50, 100, (56, 112)),
        # rounds to 28 x 28 = 784 < 3,136; beta = sqrt(3136 / 800) = 1.980;
        # 20 * beta / 28 = 1.41 -> ceil 2 -> 56, 40 * beta / 28 = 2.83 -> ceil 3 -> 84
        (20, 40, (56, 84)),
    ],
)
def test_smart_resize_default_budget(height, width, expected):
    assert smart_resize(height, width) == expected


def test_smart_resize_custom_budget():
    # 504 x 700 > 200,000; beta = sqrt(350,000 / 200,000) = 1.3229;
    # 500 / beta / 28 = 13.50 -> 13 -> 364, 700 / beta / 28 = 18.90 -> 18 -> 504
    assert smart_resize(500, 700, max_pixels=200_000) == (364, 504)


@pytest.mark.parametrize(("height", "width"), [(0, 10), (10, -1), (10, 2010)])
def test_smart_resize_rejects_empty_and_extreme_images(height, width):
    with pytest.raises(ValueError):
        smart_resize(height, width)


def test_model_grid_is_width_height():
    assert model_grid((1920, 1080)) == (1316, 728)
    assert model_grid((700, 500), max_pixels=200_000) == (504, 364)


# --------------------------------------------------------------------- grid conversion


def test_to_model_grid_rounds_to_integers():
    size, grid = (1000, 500), (560, 280)  # scale 1000 / 560 = 500 / 280 = 1.7857
    assert grid_scale(size, grid) == pytest.approx((1.7857142857, 1.7857142857))
    assert to_model_grid([[100, 50, 300, 200]], size, grid) == [[56, 28, 168, 112]]
    # 101 * 0.56 = 56.56 -> 57, 51 * 0.56 = 28.56 -> 29, ...
    assert to_model_grid([[101, 51, 301, 201]], size, grid) == [[57, 29, 169, 113]]


def test_from_model_grid_inverts_to_model_grid():
    size, grid = (1000, 500), (560, 280)
    assert from_model_grid([[56, 28, 168, 112]], size, grid) == [
        pytest.approx([100.0, 50.0, 300.0, 200.0])
    ]


# ------------------------------------------------------------------------ boxes and IoU


def test_answer_units_are_grid_pixels_or_cells_of_the_factor():
    assert answer_unit("pixels") == 1 and answer_unit("pixels", 32) == 1
    assert answer_unit("cells") == 28 and answer_unit("cells", 32) == 32
    with pytest.raises(ValueError, match="'pixels' or 'cells'"):
        answer_unit("cell")


def test_cell_boxes_are_the_cells_a_box_overlaps():
    grid = (112, 112)
    # columns 30..59 touch cells 1 and 2; rows 10..28 touch cells 0 and 1 (row 28 is cell 1)
    assert to_answer_boxes([[30, 10, 60, 29]], grid, grid, 28) == [[1, 0, 3, 2]]
    # edges on cell edges stay there: [28, 56) is cell 1 alone
    assert to_answer_boxes([[28, 28, 56, 56]], grid, grid, 28) == [[1, 1, 2, 2]]
    # a 200 x 100 image on a 112 x 56 grid: [20, 10, 60, 50] is [11.2, 5.6, 33.6, 28]
    assert to_answer_boxes([[20, 10, 60, 50]], (200, 100), (112, 56), 28) == [[0, 0, 2, 1]]
    # unit 1 is today's model-grid answer
    assert to_answer_boxes([[20, 10, 60, 50]], (200, 100), (112, 56)) == (
        to_model_grid([[20, 10, 60, 50]], (200, 100), (112, 56))
    )


@pytest.mark.parametrize(("size", "grid"), [((112, 112), (112, 112)), ((200, 100), (112, 56)),
                                            ((1000, 700), (560, 392))])  # fmt: skip
def test_a_cell_answer_read_back_covers_its_box(size, grid):
    rng = np.random.default_rng(0)
    for _ in range(200):
        x1, x2 = sorted(rng.uniform(0, size[0], 2))
        y1, y2 = sorted(rng.uniform(0, size[1], 2))
        [cells] = to_answer_boxes([[x1, y1, x2, y2]], size, grid, 28)
        sx, sy = answer_scale(size, grid, 28)
        read = [cells[0] * sx, cells[1] * sy, cells[2] * sx, cells[3] * sy]
        assert read[0] <= x1 + 1e-6 and read[1] <= y1 + 1e-6
        assert read[2] >= x2 - 1e-6 and read[3] >= y2 - 1e-6
        assert read[2] - read[0] <= x2 - x1 + 2 * sx and read[3] - read[1] <= y2 - y1 + 2 * sy


def test_defect_cells_mark_what_a_cell_answer_covers():
    cells = defect_cells([[30, 10, 60, 29], [100, 100, 112, 112]], (112, 112), (112, 112))
    assert cells.shape == (4, 4) and cells.dtype == np.float32
    assert [c.tolist() for c in cells.nonzero()] == [[0, 0, 1, 1, 3], [1, 2, 1, 2, 3]]
    assert not defect_cells([], (200, 100), (112, 56)).any()


def test_box_area_uses_exclusive_edges():
    assert box_area([10, 0, 20, 5]) == 50
    assert box_area([5, 5, 5, 9]) == 0
    assert box_area([9, 0, 5, 5]) == 0  # reversed corners have no area


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([0, 0, 10, 10], [0, 0, 10, 10], 1.0),
        ([0, 0, 10, 10], [5, 0, 15, 10], 50 / 150),
        ([0, 0, 10, 10], [0, 0, 5, 5], 25 / 100),
        ([0, 0, 10, 10], [10, 0, 20, 10], 0.0),  # sharing an edge is no overlap
        ([0, 0, 0, 0], [0, 0, 0, 0], 0.0),  # empty boxes
    ],
)
def test_iou(a, b, expected):
    assert iou(a, b) == pytest.approx(expected)
    assert iou(b, a) == pytest.approx(expected)


def test_clip_box():
    assert clip_box([-5, 3, 120, 90], (100, 80)) == [0, 3, 100, 80]


@pytest.mark.parametrize(
    ("box", "size", "valid"),
    [
        ([0, 0, 10, 10], None, True),
        ([0, 0, 10, 10], (10, 10), True),
        ([0, 0, 11, 10], (10, 10), False),
        ([-1, 0, 5, 5], (10, 10), False),
        ([5, 0, 5, 10], None, False),
        ([0, 0, float("nan"), 10], None, False),
        ([0, 0, 10], None, False),
    ],
)
def test_is_valid_box(box, size, valid):
    assert is_valid_box(box, size) is valid


def test_as_boxes_accepts_lists_arrays_and_none():
    assert as_boxes(None) == []
    assert as_boxes(np.array([[1, 2, 3, 4]], dtype=np.int64)) == [[1.0, 2.0, 3.0, 4.0]]
    nested = np.array([np.array([1.5, 2, 3, 4]), np.array([5, 6, 7, 8])], dtype=object)
    assert as_boxes(nested) == [[1.5, 2.0, 3.0, 4.0], [5.0, 6.0, 7.0, 8.0]]
    assert all(type(v) is float for v in as_boxes([(1, 2, 3, 4)])[0])


# ------------------------------------------------------------------------------ matching


def test_match_boxes_respects_threshold():
    gt, pred = [[0, 0, 10, 10]], [[5, 0, 15, 10]]  # IoU 1/3
    assert match_boxes(gt, pred, 0.5) == []
    assert match_boxes(gt, pred, 0.3) == [(0, 0, pytest.approx(1 / 3))]


def test_match_boxes_at_zero_needs_some_overlap():
    assert match_boxes([[0, 0, 10, 10]], [[10, 0, 20, 10]], 0.0) == []


def test_match_boxes_is_greedy_by_iou_not_by_index():
    # gt 1 fits pred 0 exactly (IoU 1) while gt 0 only reaches 0.8: gt 0 stays unmatched
    gt = [[0, 0, 10, 10], [0, 0, 8, 10]]
    assert match_boxes(gt, [[0, 0, 8, 10]], 0.5) == [(1, 0, 1.0)]


def test_match_boxes_ties_prefer_lower_gt_index():
    gt = [[0, 0, 5, 10], [5, 0, 10, 10]]  # both IoU 0.5 with the prediction
    assert match_boxes(gt, [[0, 0, 10, 10]], 0.1) == [(0, 0, 0.5)]


def test_match_boxes_ties_prefer_lower_pred_index():
    pred = [[0, 0, 5, 10], [5, 0, 10, 10]]
    assert match_boxes([[0, 0, 10, 10]], pred, 0.1) == [(0, 0, 0.5)]


def test_match_boxes_is_one_to_one_in_order_chosen():
    gt = [[0, 0, 10, 10], [0, 0, 8, 10]]
    pred = [[0, 0, 8, 10], [0, 0, 10, 10]]
    # two pairs at IoU 1: (gt 0, pred 1) first by gt index, then (gt 1, pred 0)
    assert match_boxes(gt, pred, 0.5) == [(0, 1, 1.0), (1, 0, 1.0)]
    # a duplicate prediction matches nothing once its twin took the ground truth
    assert match_boxes([[0, 0, 10, 10]], [[0, 0, 10, 10]] * 2, 0.5) == [(0, 0, 1.0)]


# --------------------------------------------------------------------------------- masks


def test_mask_to_boxes_uses_exclusive_edges():
    mask = np.zeros((30, 30), dtype=np.uint8)
    mask[5:8, 10:20] = 1  # columns 10..19, rows 5..7
    assert mask_to_boxes(mask) == [[10.0, 5.0, 20.0, 8.0]]


def test_mask_to_boxes_joins_diagonal_neighbours_and_orders_by_first_pixel():
    mask = np.zeros((6, 8), dtype=np.uint8)
    mask[1, 1] = mask[2, 2] = 1  # diagonal neighbours: one component with 8-connectivity
    mask[4, 5:8] = 255  # any non-zero value is a defect
    mask[0, 6] = 7  # first in row-major order although right of the others
    assert mask_to_boxes(mask) == [[6, 0, 7, 1], [1, 1, 3, 3], [5, 4, 8, 5]]


def test_mask_to_boxes_of_empty_mask():
    assert mask_to_boxes(np.zeros((4, 4))) == []


def test_iou_matrix_is_iou_of_every_pair():
    rng = np.random.default_rng(5)
    corners = rng.uniform(0, 100, (40, 2, 2))
    a = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)[:20]
    b = np.concatenate([corners.min(axis=1), corners.max(axis=1)], axis=1)[20:]
    b[0] = [10, 10, 10, 30]  # empty: IoU 0 with everything
    b[1] = a[3]  # the same box: IoU 1
    matrix = iou_matrix(a, b)
    assert matrix.shape == (20, 20)
    assert matrix == pytest.approx(np.array([[iou(x, y) for y in b] for x in a]))
    assert matrix[3, 1] == pytest.approx(1.0) and not matrix[:, 0].any()
