"""Domain types: frozen Structs and Enums shared by every layer."""
