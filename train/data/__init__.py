"""Data for the ranks, in one direction: ``files`` → ``sources`` → ``tokenizer`` → ``pretraining`` /
``finetuning`` (through the ``cache``) → ``prepare`` → ``batches``. Import the module you need;
this package imports nothing, so the launcher can read ``train.data.files`` without torch."""
