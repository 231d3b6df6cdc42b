"""The core: tracing, the layer as a memory, key statistics, rules and edits. Imports nothing above it."""
