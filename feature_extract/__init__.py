"""disalign.feature_extract — batch job: images + frozen stage-1 model → HDF5 feature bank.

One GPU (or CPU)::

    disalign extract --model model.ts --card card.json --root DIR --list train.txt --out train.h5
    python -m disalign extract --model model.ts --card card.json --root DIR --list train.txt --out train.h5

Many nodes (each rank takes a contiguous slice of the list, writes its shard; rank 0 assembles)::

    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29400 \\
        -m disalign extract --model model.ts --card card.json --root DIR --list train.txt \\
        --out /shared/fs/train.h5 --device cuda [--assemble concat|virtual]

On one machine, two CPU processes (what the tests run)::

    python -m torch.distributed.run --nproc-per-node 2 --master-port 29511 -m disalign extract ... --device cpu

Modules: :mod:`.preprocess` (decode, views, normalisation), :mod:`.models` (the model specs and
``LoadedModel``), :mod:`.timm_models` and :mod:`.hf_models` (``timm:`` and ``hf:``: classifier and
preprocessing from the library's API),
:mod:`.data` (list files, folders, the decoding dataset), :mod:`.device_decode` (``--decode torchvision``),
:mod:`.extract` (the chunked, resumable job), :mod:`.workdir` (parts, manifest, bank assembly),
:mod:`.distributed` (ranks and chunk ranges). The ``extract`` subcommand is :mod:`disalign.cli.extract` (a
layer above: nothing here imports the CLI). Docs: ``docs/extract.md``.
Nothing is loaded or read at import.
"""
