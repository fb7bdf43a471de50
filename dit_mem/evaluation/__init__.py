"""Benchmark evaluation: VBench and PhyGenBench protocols, generation loop, scoring, comparison.

Modules (import what you need; nothing heavy is imported here):

- ``benchmarks``: packaged prompt lists / info files and protocol constants;
- ``plan``: file names and seeds per protocol (``plan_vbench``, ``plan_phygenbench``);
- ``loop``: the ``VideoGenerator`` interface and the resumable ``run_generation`` loop;
- ``video_io``: atomic mp4 writing, reading;
- ``flicker``: temporal flickering offline (without VBench's static filter);
- ``vbench_scores`` / ``phygenbench_scores``: result parsing and aggregation;
- ``vbench_runner``: calls ``vbench evaluate`` in its own virtual environment;
- ``compare``: Markdown/CSV table and bar chart of several runs.
"""
