"""Configuration: the wg-quick file format, keys, endpoints, and the diff of two configs."""
