from vmkeep.engine.points.retention import chains_to_delete, increments_to_merge


def test_full_mode_keeps_newest() -> None:
    assert chains_to_delete([4, 1, 3, 2], 2) == [1, 2]
    assert chains_to_delete([1, 2], 2) == []
    assert chains_to_delete([1, 2, 3], None) == []
    # a copied chain (id 9) taken before 1 and 2 is the oldest, whatever its id
    assert chains_to_delete([1, 2, 9], 2, {1: 20, 2: 30, 9: 10}) == [9]


def test_increment_mode_merges_oldest_into_new_base() -> None:
    assert increments_to_merge([0, 1, 2, 3], 2) == ([0, 1], 2)
    assert increments_to_merge([2, 3, 5], 2) == ([2], 3)  # ids stay stable, gaps allowed
    assert increments_to_merge([0, 1], 2) == ([], None)
    assert increments_to_merge([0, 1, 2], None) == ([], None)
    assert increments_to_merge([0, 1, 2, 3], 1) == ([0, 1, 2], 3)
