"""hem-bootstrap: offline hard-negative mining (bootstrapping) for detectors on ortho-imagery."""

__version__ = "0.1.0"
