"""Independent MCP clients and servers for the interoperability tests (the npm packages live here too)."""
