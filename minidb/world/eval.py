"""The old home of the world's reader and metrics, kept for the names others import and for
`python -m minidb.world.eval --train-reader | --reader-accuracy` (minidb.cli.eval.reader_main).

    minidb.world.reader            the reader: pixels measured, shape and pattern read by a small CNN
    minidb.world.metrics           prompt fidelity, a model's evaluation, DreamBooth's metrics
    minidb.world.reader_training   the reader's training and accuracy
"""
from minidb.world.metrics import (class_prompts, diversity, evaluate_model, format_table, held_out_prompts,  # noqa: F401
                            mean_similarity, prompt_fidelity, subject_metrics)
from minidb.world.reader import (CROP, READER, Reader, ReaderNet, crop, largest_component, measure,  # noqa: F401
                           segment)
from minidb.world.reader_training import reader_accuracy, rendered_set, train_reader, world_vae  # noqa: F401

if __name__ == "__main__":
    import sys

    from minidb.cli.eval import reader_main
    sys.exit(reader_main())
