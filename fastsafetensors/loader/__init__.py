"""The I/O core. Bytes flow one way: a pure plan of reads (plan.py) -> positioned reads
(posix.py, with page-cache residency from pagecache.py) -> host buffers (cpu.py) or pinned staging
and device copies (cuda.py) -> framework tensors."""
