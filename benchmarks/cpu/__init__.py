"""CPU benchmark suites: quant, quality, speed, loading (one module each) and their shared helpers."""
