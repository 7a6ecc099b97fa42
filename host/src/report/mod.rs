//! The run report: one self-contained `report.html` (results table, image
//! grids, loss curves, config) written atomically.
