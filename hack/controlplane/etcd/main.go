// etcd is the upstream etcd server binary: the same entry point as the root
// module's main.go, which cannot be `go install`ed because of its replaces.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
