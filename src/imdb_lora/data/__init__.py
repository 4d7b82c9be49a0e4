"""Data: IMDB (folder, archive, download) and labeled files; splits; tokenization; batches.

Labels are 0 = negative, 1 = positive everywhere. Validation is carved from train (stratified, seeded);
the test split is only ever reported, never used to choose anything.
"""
