"""Detection scoring maths without I/O: one-to-one matching, COCO AP, precision-recall sweeps."""
