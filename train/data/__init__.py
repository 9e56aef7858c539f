"""Data for the ranks, in one direction: ``files`` → ``sources`` (through ``scratch``, where
``datasets`` keeps its cache) → ``documents`` → ``tokenizer`` → ``pretraining`` (through ``encode``:
bounded pieces on worker processes, and ``packing``) / ``finetuning`` (through the ``cache``) →
``prepare`` → ``batches``. Import the module you need; this package imports nothing, so the launcher
can read ``train.data.files`` without torch."""
