"""Data room: image sources -> Parquet shards (the prepared-dataset contract) ->
Ray Data datasets and tensors. Split in two files: `sources` (what can be read)
and `prepared` (writing, reading and converting the contract's shards)."""
from .prepared import (  # noqa: F401
    COLUMNS, MANIFEST, actor_cpus, actor_threads, largest_node, batch_to_tensors, decode_images, init_ray, local_ray_on_loopback, open_dataset, prepare, set_console,
    QUIET, skip_progress_notice,
    SAMPLE_PER_SHARD, read_arrays, read_images_by_id, read_manifest, sample_rows, save_grid, shard_paths, to_device, to_float, to_uint8,
)
from .sources import FAKE_CHUNK, SOURCES, center_crop_resize, check_resolution, fit_resolution, get_source, make_fake  # noqa: F401
