"""uploader: moves files from an NFS share to Azure Blob Storage, session by session."""
