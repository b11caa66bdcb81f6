"""data-curriculum: score, select, augment and order a corpus into curricula on Ray Data."""

__version__ = "0.1.0"
