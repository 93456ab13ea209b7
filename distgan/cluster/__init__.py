"""The clustering room: FAISS k-means over embeddings (or raw pixels), assignment of
every point, metrics from contingency tables, montage, and the linear probe.
No training code; Ray only where work is spread over the cluster."""
from .features import Batch, Features, array_features, collect, embedding_features, pixel_features  # noqa: F401
from .distributed import check_request, default_sample, fit_remote, set_faiss_threads  # noqa: F401
from .fit import (Balanced, Mixture, Preprocess, assign, centroid_index, distance_path, faiss_devices, fit_preprocess, fit_sample,  # noqa: F401
                  fit_clusters, gaussian_mixture, kmeans, restarts, search)
from .metrics import cluster_acc, clustering_metrics, contingency, metrics_from_contingency, purity  # noqa: F401
from .probe import BASELINES, MAX_TEST, MAX_TRAIN, linear_probe, pixel_baselines, probe_remote, probe_table, sample_splits  # noqa: F401
from .stage import montage, montage_ids, run_clustering  # noqa: F401
