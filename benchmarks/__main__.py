"""``python -m benchmarks`` runs every benchmark."""

from benchmarks import bench_engine

bench_engine.main()
