"""The quality benchmark's bookkeeping: rows accumulate over sittings, keyed by what trained them."""
from benchmarks.quality import _key, recipe
from distgan import config as C


def _recipe(**over) -> str:
    return recipe(C.to_dict(C.load(None, {"objective.name": "contrastive", **over})))


def test_a_changed_shipped_recipe_is_a_new_row_and_paths_seeds_budgets_are_not():
    base = _recipe()
    # the same --set flags over a shipped config whose augmentations changed: another recipe
    assert _recipe(**{"objective.augment": "crop,cutout,intensity"}) != base
    assert _recipe(**{"data.batch_size": 128}) != base
    # where the data sits, the seed and the budget are the row's other columns, not its recipe
    assert _recipe(**{"data.path": "/elsewhere", "train.seed": 3, "train.minutes": 30.0}) == base
    row = {"dataset": "fashion-mnist", "model": "contrastive", "minutes": 10, "seed": 0, "sets": "",
           "read-out": "grid4-max (3584-d), pca", "manifold": "umap", "method": "kmeans"}
    assert _key({**row, "recipe": base}) != _key({**row, "recipe": _recipe(**{"objective.augment": "crop"})})
    assert _key(row) != _key({**row, "recipe": base})  # rows from before the digest stay beside new ones
