"""Data room: image sources -> Parquet shards (the prepared-dataset contract) ->
Ray Data datasets and tensors. Split in three files: `sources` (what can be read),
`prepared` (writing, reading and converting the contract's shards) and `raystart`
(starting or joining the Ray they are read with)."""
from .prepared import (  # noqa: F401
    COLUMNS, MANIFEST, actor_cpus, actor_threads, largest_node, batch_to_tensors, decode_images, open_dataset, prepare,
    SAMPLE_PER_SHARD, read_arrays, read_images_by_id, read_manifest, sample_rows, save_grid, shard_paths, to_device, to_float, to_uint8,
)
from .raystart import QUIET, RAY_DEFAULTS, init_ray, local_ray_on_loopback, ray_defaults, ray_data_console, set_console, start_local_ray  # noqa: F401
from .sources import FAKE_CHUNK, SOURCES, center_crop_resize, check_resolution, fit_resolution, get_source, make_fake  # noqa: F401
