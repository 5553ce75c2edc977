"""The data module: sources -> clean examples -> phase split -> tokens -> batches."""
