//! Evaluation: scorers (image-filter plugins, CLIPScore) and statistics
//! (means with 95% intervals) over held-out prompts.
