module github.com/spoe-go/spoe

go 1.23

require (
	github.com/pkg/errors v0.9.1
	github.com/sirupsen/logrus v1.10.2
)

require golang.org/x/sys v0.13.0 // indirect
