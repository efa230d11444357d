"""Architecture conversions (GQA→MLA)."""
